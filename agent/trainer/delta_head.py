"""Skip adapters trained as ΔW_k itself (d_k × C) instead of the factors A_k B_k.

logits = z + Σ_k x_k ΔW_k = [x | z] Mᵀ with M = [ΔWᵀ | I], the layout of `SkipHead`, but here M
is what trains: its gradient is one product, (p − y)ᵀ [x | z], and the SGD step touches only
the ΔWᵀ columns. The loss is then convex in what trains (softmax regression on the frozen
features), which matters when a device has few labels or starts from a fleet aggregate: the
factors A_k B_k make the same function class non-convex, and a fresh B_k = 0 starts every
round at a saddle of the product. With C classes, ΔW_k has rank at most C anyway, so the rank
of the factors is no restriction on the fan task (C = 3 < rank 4); on HAR (C = 6) it is.
Each step is 7 NumPy calls (the factor head needs 11).
"""

from __future__ import annotations

import numpy as np

from agent.trainer.skip_head import BatchViews, LogitHead


class DeltaHead(LogitHead):
    def __init__(self, in_dims, n_classes: int, *, lr, batch_size: int, start=None):
        C = n_classes
        self.in_dims, self.n_classes = tuple(in_dims), C
        self.D = D = sum(in_dims)
        self.W = D + C
        self._init_softmax(C, lr, batch_size)
        self.M = np.zeros((C, self.W), dtype=np.float32)  # (C, W) [ΔWᵀ | I]: what trains
        self.M[:, D:] = np.eye(C, dtype=np.float32)  # z passes to the logits
        self.theta = self.M.reshape(-1)  # θ is M itself: skip.py saves and restores it
        self.G = np.empty((C, self.W), dtype=np.float32)  # (C, W) gradient wrt M, then step
        if start is not None:
            self.assign(start)
        self.forward = self._forward_phase()
        self.backward, self.update = self._training_phases()

    def refresh(self):
        """Nothing to recompute: M is what trains."""

    def _training_phases(self):
        D = self.D
        G, MD, GD = self.G, self.M[:, :D], self.G[:, :D]  # (C, D) views: ΔWᵀ, its step
        step = np.float32(self.lr / self.batch_size / self.label_scale)  # exact: a power of two
        subtract, multiply = np.subtract, np.multiply

        def backward(v: BatchViews):
            x, _, _, gT, _, _ = v
            gT.dot(x, G)  # (C, W) = (C, b) @ (b, W): gradient wrt M (its I part is unused)
            multiply(GD, step, GD)  # (C, D) × lr/batch/2ᵏ
            return v

        def update(_views=None):
            subtract(MD, GD, MD)  # (C, D): ΔWᵀ -= step

        return backward, update

    # ------------------------------------------------------------------ deltas
    def _blocks(self):
        col = 0
        for d in self.in_dims:
            yield slice(col, col + d)
            col += d

    def deltas(self) -> list[np.ndarray]:
        """[ΔW_k (d_k, C)] per adapted layer, as copies."""
        return [self.M[:, cols].T.copy() for cols in self._blocks()]

    def gradients(self) -> list[np.ndarray]:
        """The last backward's steps per adapted layer, shaped like deltas()."""
        return [self.G[:, cols].T.copy() for cols in self._blocks()]

    def assign(self, deltas):
        """Set every ΔW_k; shapes must match deltas(). Nothing is written if one does not fit."""
        blocks = list(zip(self._blocks(), deltas, strict=True))
        for (cols), delta in blocks:
            expected = (cols.stop - cols.start, self.n_classes)
            if np.shape(delta) != expected:
                raise ValueError(f"delta of shape {np.shape(delta)} does not fit {expected}")
        for cols, delta in blocks:
            self.M[:, cols] = np.asarray(delta, dtype=np.float32).T

    @property
    def trainable_params(self) -> int:
        return self.D * self.n_classes
