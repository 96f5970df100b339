"""The Skip-LoRA adapter a device runs: one low-rank path from each layer's input to the logits.

Effective update of layer k: ΔW_k = delta_k + A_k B_k (d_k × C), where `delta_k` is a frozen
part (e.g. a fleet aggregate the device started from) and A_k, B_k are the factors trained on
the device. Logits = z + Σ_k x_k ΔW_k, with z the frozen head output. LoRA-Last is the special
case with only the last layer. Any number of layers: the paper's MLP has 3, the CNNs 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.trainer.errors import AdapterError
from shared.protocol.checks import ADAPTER_VALUE_BOUND


@dataclass(frozen=True)
class Adapter:
    layer_dims: tuple[int, ...]  # d_k, the input width of layer k (k = 1..K)
    n_classes: int
    deltas: tuple[np.ndarray | None, ...] = ()  # ΔW_k part: d_k × C; () is none on any layer
    factors: tuple[tuple[np.ndarray, np.ndarray] | None, ...] = ()  # (A_k, B_k) per layer

    def __post_init__(self):
        n = len(self.layer_dims)
        for name in ("deltas", "factors"):
            parts = getattr(self, name) or (None,) * n
            if len(parts) != n:
                raise AdapterError(f"{name}: {len(parts)} entries for {n} layers")
            object.__setattr__(self, name, tuple(parts))

    def effective_deltas(self) -> list[np.ndarray | None]:
        """ΔW_k = delta_k + A_k B_k per layer, None where the layer has no adapter."""
        out = []
        for delta, factor in zip(self.deltas, self.factors, strict=True):
            total = None if delta is None else delta.astype(np.float32)
            if factor is not None:
                product = factor[0] @ factor[1]  # (d_k, C) = (d_k, R) @ (R, C)
                total = product if total is None else total + product
            out.append(total)
        return out

    def delta_logits(self, xs: list[np.ndarray]) -> np.ndarray:
        """Σ_k x_k ΔW_k for layer inputs xs = [x1, x2, ..., xK]."""
        out = np.zeros((xs[0].shape[0], self.n_classes), dtype=np.float32)  # (B, C)
        for x, delta in zip(xs, self.effective_deltas(), strict=True):
            if delta is not None:
                out += x @ delta  # (B, C) += (B, d_k) @ (d_k, C)
        return out

    def frozen(self) -> Adapter:
        """The same update with every factor folded into the frozen deltas."""
        return Adapter(self.layer_dims, self.n_classes, tuple(self.effective_deltas()))

    @property
    def is_empty(self) -> bool:
        return all(d is None for d in self.deltas) and all(f is None for f in self.factors)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for k in range(len(self.layer_dims)):
            if self.deltas[k] is not None:
                arrays[f"delta{k + 1}"] = self.deltas[k]
            if self.factors[k] is not None:
                arrays[f"A{k + 1}"], arrays[f"B{k + 1}"] = self.factors[k]
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict, layer_dims, n_classes: int) -> Adapter:
        """Build and check an adapter from its wire form (names delta1..K, A1..K, B1..K)."""
        allowed = {f"{p}{k}" for p in ("delta", "A", "B") for k in range(1, len(layer_dims) + 1)}
        unknown = set(arrays) - allowed
        if unknown:
            raise AdapterError(f"unknown adapter arrays: {sorted(unknown)}")
        deltas, factors = [], []
        for k, d_k in enumerate(layer_dims, start=1):
            deltas.append(_checked(arrays, f"delta{k}", (d_k, n_classes)))
            factors.append(_factor_pair(arrays, k, d_k, n_classes))
        adapter = cls(tuple(layer_dims), n_classes, tuple(deltas), tuple(factors))
        for k, delta in enumerate(adapter.effective_deltas(), start=1):
            if delta is not None:  # bounded factors can still multiply past the bound
                _check_bound(delta, f"ΔW{k}")
        return adapter

    def n_parameters(self) -> int:
        return sum(a.size for a in self.to_arrays().values())


def _factor_pair(arrays, k: int, d_k: int, n_classes: int):
    if (f"A{k}" in arrays) != (f"B{k}" in arrays):
        raise AdapterError(f"layer {k}: A{k} and B{k} must come together")
    if f"A{k}" not in arrays:
        return None
    A_raw = np.asarray(arrays[f"A{k}"])
    if A_raw.ndim != 2 or A_raw.shape[1] == 0:
        raise AdapterError(f"A{k} has shape {A_raw.shape}, expected ({d_k}, rank)")
    rank = A_raw.shape[1]
    A = _checked(arrays, f"A{k}", (d_k, rank))
    B = _checked(arrays, f"B{k}", (rank, n_classes))
    return A, B


def _checked(arrays, name: str, shape) -> np.ndarray | None:
    if name not in arrays:
        return None
    array = np.asarray(arrays[name])
    if array.shape != tuple(shape):
        raise AdapterError(f"{name} has shape {array.shape}, expected {tuple(shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise AdapterError(f"{name} has dtype {array.dtype}, expected floating point")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise AdapterError(f"{name} holds NaN or infinity")
    _check_bound(array, name)
    return array


def _check_bound(array: np.ndarray, name: str) -> None:
    largest = float(np.abs(array).max(initial=0.0))
    if largest > ADAPTER_VALUE_BOUND:
        raise AdapterError(f"{name} holds {largest:.3g}, beyond the bound {ADAPTER_VALUE_BOUND:g}")
