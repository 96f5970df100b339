"""Skip-LoRA and Skip2-LoRA: adapters from every layer's input straight to the logits.

logits = z + Σ_k (x_k A_k) B_k, with x_k and z frozen. No gradient flows into the base model,
so backward is the adapters' own few products. With Skip-Cache (Skip2-LoRA) the frozen
forward pass runs once per sample; afterwards an epoch is one gather of cached rows and the
adapter arithmetic.

Why the adapters are fused: with batch 20 the arithmetic of one adapter takes less time
than NumPy's per-call overhead (about 1 µs), so three adapters are kept as one block-diagonal
A (D × KR, D = Σ d_k) and one stacked B (KR × C). The forward is then one product instead of
three, and the gradient of A is masked to its diagonal blocks. The result is the same method
(each A_k sees only x_k, each B_k only u_k); `flops.py` counts the method's own work.
"""

from __future__ import annotations

import numpy as np

from agent.trainer.adapter import Adapter
from agent.trainer.cache import make_cache


class SkipTrainer:
    def __init__(self, model, *, layers=(1, 2, 3), lr, rank, rng, cache="none", start=None,
                 n_samples, capacity=None, batch_size=20):  # fmt: skip
        dims = model.layer_input_dims
        self.model = model
        self.layers = tuple(layers)
        self.rank = rank
        self.n_classes = C = model.n_classes
        self.lr = np.float32(lr)
        self.start = start.frozen() if start is not None and not start.is_empty else None
        self.in_dims = [dims[k - 1] for k in self.layers]
        self.cached_layers = [k for k in self.layers if k >= 2]
        self.x1_width = dims[0] if 1 in self.layers else 0
        D, KR = sum(self.in_dims), len(self.layers) * rank
        self.D = D
        self.A = np.zeros((D, KR), dtype=np.float32)  # (D, KR) block-diagonal
        self.mask = np.zeros((D, KR), dtype=np.float32)  # (D, KR) 1 on the diagonal blocks
        row = 0
        for i, d in enumerate(self.in_dims):
            block = (slice(row, row + d), slice(i * rank, (i + 1) * rank))
            self.A[block] = rng.standard_normal((d, rank)) / np.sqrt(d)
            self.mask[block] = 1.0
            row += d
        self.B = np.zeros((KR, C), dtype=np.float32)  # (KR, C): adapted model starts at base
        self.W_ext = np.zeros((D + C, C), dtype=np.float32)  # [ΔW ; I]: z passes through
        self.W_ext[D:] = np.eye(C, dtype=np.float32)
        self.GW = np.empty((D, C), dtype=np.float32)
        widths = [dims[k - 1] for k in self.cached_layers]
        self.cache = None if cache == "none" else make_cache(cache, n_samples, widths, C, capacity)
        self.source = self.buffer = self._bufs = None  # epoch layout and per-batch work arrays
        self._snapshot, self.stable = None, False
        self.batch_size = batch_size

    # ------------------------------------------------------------- frozen part
    def frozen_rows(self, x1):
        """Cache rows [x_k for cached k | z] of standardised inputs (B, N)."""
        xs, z = self.model.frozen_features(x1, standardized=True)
        if self.start is not None:  # a frozen adapter the device already runs: part of z
            z = z + self.start.delta_logits(xs)  # (B, C)
        # softmax is unchanged by a per-row shift; with max(z) = 0 cached, the head can skip
        # the usual max-subtraction (see head_forward for what guards against overflow)
        z = z - z.max(axis=1, keepdims=True)  # (B, C)
        return np.concatenate([xs[k - 1] for k in self.cached_layers] + [z], axis=1)

    # ------------------------------------------------------------------ epochs
    def begin_epoch(self, X1, labels, onehot, perm):
        """Prepare this epoch's rows [adapter inputs | z | one-hot], in shuffled order."""
        self.check_overflow()
        self._snapshot = (self.A.copy(), self.B.copy())
        n, C, N = len(perm), self.n_classes, self.x1_width
        self.ids, self.X1 = perm, X1
        if self.cache is not None and self.cache.complete:
            # every sample cached: one gather per epoch, no frozen forward at all
            if self.source is None:  # [x1 | cached rows | one-hot], laid out once
                self.source = np.concatenate([X1[:, :N], self.cache.rows, onehot], axis=1)
            np.take(self.source, perm, axis=0, out=self._epoch_buffer(n))
            self.ready = True
            self.cache.stats.lookups += n
            self.cache.stats.hits += n
            return
        buffer = self._epoch_buffer(n)
        if N:
            buffer[:, :N] = X1[perm]
        buffer[:, self.D + C :] = onehot[perm]
        self.ready = False

    def _epoch_buffer(self, n):
        if self.buffer is None or len(self.buffer) != n:
            self.buffer = np.empty((n, self.D + 2 * self.n_classes), dtype=np.float32)
        return self.buffer

    def forward(self, start, stop):
        rows = self.buffer[start:stop]  # (B, D + 2C) view
        if not self.ready:
            rows[:, self.x1_width : self.D + self.n_classes] = self._frozen_batch(start, stop)
        return self.head_forward(rows)

    def _frozen_batch(self, start, stop):
        ids = self.ids[start:stop]
        x1 = self.X1[ids]  # (B, N)
        if self.cache is None:  # Skip-LoRA: the frozen forward every batch
            return self.frozen_rows(x1)
        hit, rows = self.cache.lookup(ids)
        if not hit.all():
            miss = ~hit
            rows[miss] = self.cache.store(ids[miss], self.frozen_rows(x1[miss]))
        return rows

    # --------------------------------------------------------- adapter head
    # The head works on the product ΔW = A B (block k: A_k B_k, d_k × C) because every adapter
    # ends in the logits: logits = x ΔW + z, GW = xᵀ g, gB_k = A_kᵀ GW_k, gA_k = GW_k B_kᵀ, the
    # same gradients as through u_k = x_k A_k with about half the arithmetic (C <= R here).
    # z rides in the same product as an identity block. Every step writes into preallocated
    # arrays (`out=`): at this size allocating a result costs as much as computing it.
    def _work(self, b):
        if self._bufs is None or self._bufs[0].shape[0] != b:
            C, f32 = self.n_classes, np.float32
            self._bufs = (np.empty((b, C), f32), np.empty((b, 1), f32))  # logits, row sums
        return self._bufs

    def head_forward(self, rows):
        D, C = self.D, self.n_classes
        g, den = self._work(len(rows))  # preallocated (B, C), (B, 1)
        np.matmul(rows[:, : D + C], self.W_ext, out=g)  # (B, C) = [x | z] @ [ΔW ; I]
        if self.stable:  # only after an overflow: z <= 0 keeps exp finite for sane adapters
            np.subtract(g, g.max(axis=1, keepdims=True), out=g)
        np.exp(g, out=g)
        np.add.reduce(g, axis=1, keepdims=True, out=den)  # (B, 1)
        np.divide(g, den, out=g)  # (B, C) softmax
        np.subtract(g, rows[:, D + C :], out=g)  # (B, C) batch-summed cross-entropy gradient
        np.multiply(g, self.lr / len(g), out=g)  # (B, C) mean-loss gradient x step size
        return rows[:, :D], g

    def backward(self, ctx):
        xb, g = ctx
        np.matmul(xb.T, g, out=self.GW)  # (D, C) = (D, B) @ (B, C): gradient wrt ΔW
        gB = self.A.T @ self.GW  # (KR, C) = (KR, D) @ (D, C): block k gives A_kᵀ GW_k
        gA = self.GW @ self.B.T  # (D, KR) = (D, C) @ (C, KR)
        gA *= self.mask  # keep GW_k B_kᵀ: each A_k learns from its own x_k only
        return gA, gB

    def update(self, steps):
        gA, gB = steps
        np.subtract(self.A, gA, out=self.A)
        np.subtract(self.B, gB, out=self.B)
        np.matmul(self.A, self.B, out=self.W_ext[: self.D])  # ΔW = A B, block-diagonal A

    def check_overflow(self):
        """Redo the last epoch with a max-subtracting softmax if its exp overflowed.

        Logits are z + x ΔW with max(z) = 0, so exp overflows only if the adapter alone pushes
        a logit past ~88. Then the epoch's updates are NaN: restore the adapter saved when the
        epoch began, replay the same batches with the stable softmax, and keep it from then on.
        """
        if self._snapshot is None or (np.isfinite(self.B).all() and np.isfinite(self.A).all()):
            return
        self.A[...], self.B[...] = self._snapshot
        np.matmul(self.A, self.B, out=self.W_ext[: self.D])
        self.stable = True
        for start in range(0, len(self.buffer), self.batch_size):
            rows = self.buffer[start : start + self.batch_size]
            self.update(self.backward(self.head_forward(rows)))

    # ------------------------------------------------------------- results
    def adapter(self) -> Adapter:
        self.check_overflow()
        factors = [None, None, None]
        row = 0
        for i, (k, d) in enumerate(zip(self.layers, self.in_dims, strict=True)):
            cols = slice(i * self.rank, (i + 1) * self.rank)
            factors[k - 1] = (self.A[row : row + d, cols].copy(), self.B[cols].copy())
            row += d
        deltas = self.start.deltas if self.start is not None else (None, None, None)
        dims = self.model.layer_input_dims
        return Adapter(dims, self.n_classes, deltas, tuple(factors))

    def logits(self, X1):
        xs, z = self.model.frozen_features(X1, standardized=True)
        return z + self.adapter().delta_logits(xs)

    @property
    def trainable_params(self) -> int:
        return sum(d * self.rank + self.rank * self.n_classes for d in self.in_dims)

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache.stats.hit_rate if self.cache is not None else 0.0
