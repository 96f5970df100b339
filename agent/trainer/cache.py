"""Skip-Cache: the frozen activations of each sample, computed once and reused every epoch.

A cache row holds, for one sample, the cached adapter inputs of layers 2..3 (x2, x3: the
activations after BN and ReLU) followed by the frozen head output z (before adapters). The
first layer's input x1 is the sample itself and is not duplicated.

- `DenseCache`: the paper's choice, one float32 row per sample id, O(1) look-up.
- `BoundedCache`: at most `capacity` rows for tight memory. Epochs visit samples in a fresh
  random order, so every sample is reused exactly once per epoch and any eviction would only
  churn: the cache keeps the first `capacity` samples it sees, which gives the best possible
  hit rate, capacity / n, at the least cost.
- `QuantizedCache`: 8- or 4-bit codes with one float16 scale per row and segment (x2, x3 are
  ReLU outputs, so zero is their minimum and a scale suffices), z kept as float16.
"""

from __future__ import annotations

import numpy as np


class CacheStats:
    def __init__(self):
        self.lookups = 0
        self.hits = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class DenseCache:
    kind = "dense"

    def __init__(self, n_samples: int, width: int):
        self.rows = np.zeros((n_samples, width), dtype=np.float32)  # (n, W)
        self.filled = np.zeros(n_samples, dtype=bool)  # (n,)
        self._complete = False
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    @property
    def complete(self) -> bool:
        if not self._complete:  # rows are never dropped: once complete, always complete
            self._complete = bool(self.filled.all())
        return self._complete

    def lookup(self, ids):
        """(hit mask (B,), rows (B, W) valid where hit)."""
        hit = self.filled[ids]  # (B,)
        self.stats.lookups += len(ids)
        self.stats.hits += int(hit.sum())
        return hit, self.rows[ids]

    def store(self, ids, rows):
        """Store rows for ids; returns what later look-ups will return (exact here)."""
        self.rows[ids] = rows
        self.filled[ids] = True
        return rows


class BoundedCache:
    kind = "bounded"

    def __init__(self, n_samples: int, width: int, capacity: int):
        if capacity < 0:
            raise ValueError("cache capacity must be >= 0")
        self.capacity = min(capacity, n_samples)
        self.rows = np.zeros((self.capacity, width), dtype=np.float32)  # (cap, W)
        self.slot_of = np.full(n_samples, -1, dtype=np.int32)  # (n,) sample id -> slot
        self.used = 0
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.slot_of.nbytes

    complete = False  # never takes the whole-epoch fast path

    def lookup(self, ids):
        slots = self.slot_of[ids]  # (B,)
        hit = slots >= 0
        rows = np.empty((len(ids), self.rows.shape[1]), dtype=np.float32)  # (B, W)
        rows[hit] = self.rows[slots[hit]]
        self.stats.lookups += len(ids)
        self.stats.hits += int(hit.sum())
        return hit, rows

    def store(self, ids, rows):
        free = self.capacity - self.used
        take = ids[:free]
        if len(take):
            slots = np.arange(self.used, self.used + len(take), dtype=np.int32)
            self.rows[slots] = rows[: len(take)]
            self.slot_of[take] = slots
            self.used += len(take)
        return rows


class QuantizedCache:
    def __init__(self, n_samples: int, segment_widths: tuple[int, ...], n_classes: int, bits: int):
        if bits not in (4, 8):
            raise ValueError("quantized cache supports 8 or 4 bits")
        if bits == 4 and any(w % 2 for w in segment_widths):
            raise ValueError("4-bit cache needs even segment widths")
        self.kind = f"q{bits}"
        self.bits = bits
        self.levels = (1 << bits) - 1
        self.widths = segment_widths
        self.n_classes = n_classes
        code_width = sum(segment_widths) // (8 // bits)
        self.codes = np.zeros((n_samples, code_width), dtype=np.uint8)  # (n, packed)
        self.scales = np.zeros((n_samples, len(segment_widths)), dtype=np.float16)  # (n, S)
        self.z = np.zeros((n_samples, n_classes), dtype=np.float16)  # (n, C)
        self.filled = np.zeros(n_samples, dtype=bool)
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.z.nbytes

    complete = False  # rows are dequantized per batch, never held as float32 for a whole epoch

    def lookup(self, ids):
        hit = self.filled[ids]
        self.stats.lookups += len(ids)
        self.stats.hits += int(hit.sum())
        return hit, self._decode(self.codes[ids], self.scales[ids], self.z[ids])

    def store(self, ids, rows):
        codes, scales, z = self._encode(rows)
        self.codes[ids], self.scales[ids], self.z[ids] = codes, scales, z
        self.filled[ids] = True
        # the values training sees are the cached ones, from the first epoch on
        return self._decode(codes, scales, z)

    # ---------------------------------------------------------------- codecs
    def _segments(self):
        start = 0
        for width in self.widths:
            yield slice(start, start + width)
            start += width

    def _encode(self, rows):
        acts = rows[:, : sum(self.widths)]  # (B, Wx) non-negative
        scales = np.empty((len(rows), len(self.widths)), dtype=np.float16)  # (B, S)
        codes = np.empty(acts.shape, dtype=np.uint8)  # (B, Wx)
        for s, seg in enumerate(self._segments()):
            peak = acts[:, seg].max(axis=1)  # (B,)
            scale = (np.maximum(peak, 1e-12) / self.levels).astype(np.float16)  # (B,)
            scale = np.maximum(scale, np.float16(6e-8))  # float16 must not round it to 0
            scales[:, s] = scale
            q = np.rint(acts[:, seg] / scale[:, None].astype(np.float32))  # (B, w)
            codes[:, seg] = np.clip(q, 0, self.levels)
        if self.bits == 4:  # two codes per byte: even columns low nibble, odd high
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (B, Wx/2)
        return codes, scales, rows[:, sum(self.widths) :].astype(np.float16)

    def _decode(self, codes, scales, z):
        if self.bits == 4:
            unpacked = np.empty((len(codes), codes.shape[1] * 2), dtype=np.uint8)  # (B, Wx)
            unpacked[:, 0::2] = codes & 0x0F
            unpacked[:, 1::2] = codes >> 4
            codes = unpacked
        out = np.empty((len(codes), codes.shape[1] + self.n_classes), dtype=np.float32)
        for s, seg in enumerate(self._segments()):
            out[:, seg] = codes[:, seg] * scales[:, s : s + 1].astype(np.float32)  # (B, w)
        out[:, codes.shape[1] :] = z  # (B, C)
        return out


def make_cache(kind: str, n_samples: int, segment_widths, n_classes: int, capacity=None):
    width = sum(segment_widths) + n_classes
    if kind == "dense":
        return DenseCache(n_samples, width)
    if kind == "bounded":
        return BoundedCache(n_samples, width, capacity if capacity is not None else n_samples // 2)
    if kind in ("q8", "q4"):
        return QuantizedCache(n_samples, tuple(segment_widths), n_classes, int(kind[1:]))
    raise ValueError(f"unknown cache kind {kind!r}: dense, bounded, q8 or q4")
