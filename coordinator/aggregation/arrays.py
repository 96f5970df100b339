"""The Skip-LoRA adapter's wire names and the formula everything rests on: ΔW_k = delta_k + A_k B_k.

Layer k (1-based) has input width d_k; every adapter ends in the last layer's output, so ΔW_k is
d_k × C. A_k is d_k × R and B_k is R × C. Names follow docs/architecture.md: delta1..3, A1..3,
B1..3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Arrays = Mapping[str, np.ndarray]


def a_name(layer: int) -> str:
    return f"A{layer}"


def b_name(layer: int) -> str:
    return f"B{layer}"


def delta_name(layer: int) -> str:
    return f"delta{layer}"


@dataclass(frozen=True)
class AdapterShape:
    """What every adapter of one cohort must look like: (n_inputs, 96, 96) and C classes."""

    layer_dims: tuple[int, ...]
    n_classes: int

    def __post_init__(self) -> None:
        if not self.layer_dims or any(int(d) <= 0 for d in self.layer_dims):
            raise ValueError(f"layer_dims must be positive widths, got {self.layer_dims}")
        if self.n_classes <= 0:
            raise ValueError(f"n_classes must be positive, got {self.n_classes}")
        object.__setattr__(self, "layer_dims", tuple(int(d) for d in self.layer_dims))

    @property
    def layers(self) -> range:
        return range(1, len(self.layer_dims) + 1)

    def input_dim(self, layer: int) -> int:
        return self.layer_dims[layer - 1]

    def delta_shape(self, layer: int) -> tuple[int, int]:
        return (self.input_dim(layer), self.n_classes)

    def factor_names(self) -> set[str]:
        return {a_name(k) for k in self.layers} | {b_name(k) for k in self.layers}

    def delta_names(self) -> set[str]:
        return {delta_name(k) for k in self.layers}


def has_factors(arrays: Arrays) -> bool:
    return a_name(1) in arrays


def has_deltas(arrays: Arrays) -> bool:
    return delta_name(1) in arrays


def effective_delta(
    arrays: Arrays, shape: AdapterShape, layer: int, rows: slice = slice(None)
) -> np.ndarray:
    """ΔW_k = delta_k + A_k B_k in float64 (a new array), or its `rows` (input units) alone; a
    part the adapter does not carry counts as zero. A part of another shape raises ValueError:
    it is never broadcast. (It runs for every report several times a round: the product is the
    result, not added to zeros.)"""
    d, classes = shape.delta_shape(layer)
    start, stop, _ = rows.indices(d)
    expected = (stop - start, classes)
    total: np.ndarray | None = None
    if a_name(layer) in arrays:
        a = np.asarray(arrays[a_name(layer)][rows], dtype=np.float64)
        total = a @ np.asarray(arrays[b_name(layer)], dtype=np.float64)
    if delta_name(layer) in arrays:
        delta = np.asarray(arrays[delta_name(layer)][rows], dtype=np.float64)
        total = delta.copy() if total is None else delta + total
    if total is None:
        return np.zeros(expected, dtype=np.float64)
    if total.shape != expected:
        raise ValueError(f"ΔW{layer} has shape {total.shape}, the adapter's is {expected}")
    return total


def effective_deltas(arrays: Arrays, shape: AdapterShape) -> list[np.ndarray]:
    return [effective_delta(arrays, shape, k) for k in shape.layers]


# A coordinate-wise statistic stacks every report's ΔW_k: at 10,000 fan-sized reports the first
# layer alone is 61 MB of float64 (and the actor's peak memory). Stacked a block of rows at a
# time, within this: the same numbers, one more pass over the reports per extra block.
LAYER_STACK_BYTES = 16 * 2**20


# Reports whose products are taken in one batched matmul, at most (fewer where their float64
# copies would pass LAYER_STACK_BYTES: chunk_length). One product per report, in Python, took
# most of a round's aggregation (10,000 reports: ~0.8 s of CPU a pass, and a round makes several).
PRODUCT_CHUNK = 512


def chunk_length(bytes_per_report: int) -> int:
    """Reports a chunk may hold: PRODUCT_CHUNK, fewer for large adapters, at least one."""
    return max(1, min(PRODUCT_CHUNK, LAYER_STACK_BYTES // max(1, bytes_per_report)))


def layer_stack(
    reports: Sequence[Arrays], shape: AdapterShape, layer: int, rows: slice = slice(None)
) -> np.ndarray:
    """Every report's ΔW_k (or its `rows`) in one (n, rows, C) float64 array, filled in place,
    with no per-report copy kept beside it."""
    d, classes = shape.delta_shape(layer)
    start, stop, _ = rows.indices(d)
    stack = np.empty((len(reports), stop - start, classes), dtype=np.float64)
    step = _step(reports, layer, stop - start, classes)
    for begin in range(0, len(reports), step):
        chunk = reports[begin : begin + step]
        _fill_deltas(chunk, shape, layer, rows, stack[begin : begin + len(chunk)])
    return stack


def delta_chunks(
    reports: Sequence[Arrays], shape: AdapterShape, layer: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(index of its first report, ΔW_k of up to PRODUCT_CHUNK reports as one (m, d_k, C)
    float64 array), in order: a pass over every report's ΔW_k that holds one chunk at a time."""
    d, classes = shape.delta_shape(layer)
    step = _step(reports, layer, d, classes)
    for begin in range(0, len(reports), step):
        chunk = reports[begin : begin + step]
        out = np.empty((len(chunk), d, classes), dtype=np.float64)
        _fill_deltas(chunk, shape, layer, slice(None), out)
        yield begin, out


def _step(reports: Sequence[Arrays], layer: int, rows: int, classes: int) -> int:
    """chunk_length for a layer's products: each report's factors (d × R, R × C) and ΔW (d × C)
    in float64, R read off the first report (a rank that differs falls back to one at a time)."""
    first = reports[0] if reports else {}
    rank = int(np.shape(first[a_name(layer)])[-1]) if a_name(layer) in first else 0
    return chunk_length(8 * (rows * (rank + classes) + rank * classes))


def _fill_deltas(
    chunk: Sequence[Arrays], shape: AdapterShape, layer: int, rows: slice, out: np.ndarray
) -> None:
    if not _batched_products(chunk, layer, rows, out):
        for i, arrays in enumerate(chunk):
            out[i] = effective_delta(arrays, shape, layer, rows)


def _batched_products(chunk: Sequence[Arrays], layer: int, rows: slice, out: np.ndarray) -> bool:
    """out[i] = A_ik[rows] B_ik in one matmul, if every report carries factors of one rank and
    no delta for this layer; False otherwise, and for any shape that is off (effective_delta,
    one report at a time, then names it)."""
    a, b, delta = a_name(layer), b_name(layer), delta_name(layer)
    if not all(a in r and b in r and delta not in r for r in chunk):
        return False
    factors_a = [np.asarray(r[a])[rows] for r in chunk]
    factors_b = [np.asarray(r[b]) for r in chunk]
    rank = factors_a[0].shape[-1] if factors_a[0].ndim == 2 else -1
    expected_a, expected_b = (out.shape[1], rank), (rank, out.shape[2])
    if any(f.shape != expected_a for f in factors_a):
        return False
    if any(f.shape != expected_b for f in factors_b):
        return False
    np.matmul(
        np.stack(factors_a).astype(np.float64, copy=False),
        np.stack(factors_b).astype(np.float64, copy=False),
        out=out,
    )
    return True


def per_coordinate(
    reports: Sequence[Arrays],
    shape: AdapterShape,
    layer: int,
    statistic: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """statistic(stack) -> (rows, C) over the layer's stack, a block of rows at a time so that
    no stack is larger than LAYER_STACK_BYTES (statistic may reorder its stack in place)."""
    d, classes = shape.delta_shape(layer)
    per_row = max(1, len(reports) * classes * 8)
    block = max(1, LAYER_STACK_BYTES // per_row)
    out = np.empty((d, classes), dtype=np.float64)
    for start in range(0, d, block):
        rows = slice(start, min(start + block, d))
        out[rows] = statistic(layer_stack(reports, shape, layer, rows))
    return out


def deltas_as_arrays(
    deltas: list[np.ndarray], dtype: np.dtype | type = np.float32
) -> dict[str, np.ndarray]:
    """[ΔW_1, ΔW_2, ...] -> {"delta1": ..., ...} in the model's dtype (float32)."""
    return {delta_name(k): np.ascontiguousarray(d, dtype=dtype) for k, d in enumerate(deltas, 1)}
