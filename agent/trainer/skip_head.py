"""The trainable part of Skip-LoRA: adapters from every layer's input straight to the logits.

Two heads share the layout and the forward phase (`LogitHead`): `SkipHead` trains the factors
A_k, B_k of ΔW_k = A_k B_k, `DeltaHead` (delta_head.py) trains ΔW_k itself.

logits = z + Σ_k x_k A_k B_k with x_k and z frozen, so a training step is the adapters' own
few products. At batch 20 NumPy's cost per call, not arithmetic, sets the time of such small
products, so the head is laid out to need as few calls as possible (11 per batch):

- One row per sample holds [x | z] = [x_1 | x_2 | x_3 | z] (W = D + C wide, D = Σ d_k), and
  M = [ΔWᵀ | I] (C × W), so logits = [x | z] Mᵀ is one product.
- All factors live in two matrices over R = C + K·rank rows: P (R × W) holds an identity
  block for z and then A_kᵀ as diagonal blocks; Qᵀ (R × C) holds an identity and then the
  B_k. M = Q P is one product and the gradient of every factor is two. P and Qᵀ share one
  buffer, laid out so that everything that trains is one contiguous stretch: the SGD step
  is one subtraction after one multiplication by a per-entry step size, which is
  lr/batch/2ᵏ (see below) where θ trains and 0 on the block structure's zeros and the
  identities (so each A_k learns from x_k alone).
- Softmax without broadcasting: the row sums come from one product with a C × C matrix
  (already the shape of the logits). Its entries are 2⁻ᵏ with 2ᵏ >= C, and the one-hot
  labels are stored × 2ᵏ: the rows sum to at most FLT_MAX whenever every exp is finite (so
  only exp itself can overflow, and that makes NaN, which skip.py detects), and a power of
  two scales p and y exactly alike. The 2⁻ᵏ goes into the step size.
Every product writes into a preallocated array (`a.dot(b, out)`): at this size allocating a
result costs as much as computing it, and the method form skips the `__array_function__`
dispatch of `np.dot` (measured here: 0.7 µs against 1.0 µs a call). `flops.py` counts the
method's own arithmetic.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class BatchViews(NamedTuple):
    """The arrays one batch of an epoch works in, made once: rows, labels, logits."""

    x: np.ndarray  # (b, W) rows [x | z] of this batch, gathered before its forward
    y: np.ndarray  # (b, C) one-hot labels × 2ᵏ
    g: np.ndarray  # (b, C) logits, then each row's p − y × 2ᵏ (× batch/b if short)
    gT: np.ndarray  # (C, b) view of g
    den: np.ndarray  # (b, C) softmax denominators × 2⁻ᵏ, repeated along each row
    short: np.float32 | None  # batch/b for a short last batch, else None


class LogitHead:
    """What both heads share: rows [x | z], logits [x | z] Mᵀ with M = [ΔWᵀ | I] (C × W), the
    batches' arrays, and the forward phase (logits, then p − y in place).

    A head sets D, W, n_classes, batch_size, label_scale, M (C × W), stable, and its own
    backward and update phases.
    """

    def _init_softmax(self, n_classes: int, lr, batch_size: int) -> None:
        self.lr, self.batch_size = np.float32(lr), batch_size
        self.label_scale = np.float32(2.0 ** math.ceil(math.log2(n_classes)))
        self.den_weights = np.full((n_classes, n_classes), 1 / self.label_scale, np.float32)
        self.stable = False  # subtract the max before exp (after an overflow, see skip.py)

    # ----------------------------------------------------------------- batches
    def views(self, y_buffer) -> list[BatchViews]:
        """Arrays for each batch of an epoch whose shuffled labels are y_buffer (n, C).

        Batches of one length share their arrays (rows, logits): they run one at a time.
        """
        out, shared, C, size = [], {}, self.n_classes, self.batch_size
        for start in range(0, len(y_buffer), size):
            y = y_buffer[start : start + size]  # (b, C)
            b = len(y)
            if b not in shared:
                g = np.empty((b, C), np.float32)
                shared[b] = (np.empty((b, self.W), np.float32), g, g.T, np.empty_like(g))
            x, g, gT, den = shared[b]
            short = np.float32(size / b) if b != size else None
            out.append(BatchViews(x, y, g, gT, den, short))
        return out

    def _forward_phase(self):
        """forward(v): the logits, then the softmax cross-entropy gradient wrt them, in v.g.

        A closure over the arrays it uses: at ~20 µs a step, a dozen attribute look-ups per
        phase cost about 1 µs (measured). Every array is allocated once and only ever written
        in place, so binding them here is safe; `stable` can change, so it is read from the
        head at each call.
        """
        head, MT, den_weights = self, self.M.T, self.den_weights
        exp, divide, subtract, multiply = np.exp, np.divide, np.subtract, np.multiply

        def forward(v: BatchViews):
            x, y, g, _, den, short = v
            x.dot(MT, g)  # (b, C) = (b, W) @ (W, C): logits
            if head.stable:  # only after an overflow: cached z <= 0 keeps exp finite
                subtract(g, g.max(axis=1, keepdims=True), g)
            exp(g, g)  # (b, C)
            g.dot(den_weights, den)  # (b, C) = (b, C) @ (C, C): Σ exp × 2⁻ᵏ
            divide(g, den, g)  # (b, C) softmax × 2ᵏ
            subtract(g, y, g)  # (b, C) (p − y) × 2ᵏ: the labels are stored × 2ᵏ
            if short is not None:  # the mean over a short last batch: × batch/b
                multiply(g, short, g)
            return v

        return forward


class SkipHead(LogitHead):
    def __init__(self, in_dims, rank: int, n_classes: int, rng, *, lr, batch_size: int):
        C = n_classes
        self.in_dims, self.rank, self.n_classes = tuple(in_dims), rank, C
        self.D = D = sum(in_dims)
        self.W, self.R = W, R = D + C, C + len(in_dims) * rank
        self._init_softmax(C, lr, batch_size)
        # one buffer [P | Qᵀ]; rows 0..C-1 of each are the fixed identities, so the trained
        # entries [P rows C.. | Qᵀ] form one stretch from offset C·W (Qᵀ's identity inside
        # it has step size 0, like P's off-diagonal blocks)
        self.theta = np.zeros(R * W + R * C, dtype=np.float32)
        self.grad = np.zeros_like(self.theta)  # gradients, then steps: same layout
        # the step per entry: lr/batch/2ᵏ where θ trains (exact: a power of two), 0 where θ
        # must not move
        step = np.float32(self.lr / batch_size / self.label_scale)
        self.step_size = np.zeros_like(self.theta)
        self.P, self.QT = self._split(self.theta)  # (R, W), (R, C)
        self.gP, self.gQT = self._split(self.grad)
        step_P, step_QT = self._split(self.step_size)
        for (rows, cols), d in zip(self._blocks(), in_dims, strict=True):
            step_P[rows, cols] = step_QT[rows] = step
            self.P[rows, cols] = (rng.standard_normal((d, rank)) / np.sqrt(d)).T  # A_kᵀ
        self.P[:C, D:] = self.QT[:C] = np.eye(C, dtype=np.float32)  # z passes to the logits
        start = C * W  # the stretch that trains: in θ, its gradient, its step sizes
        self.step = (self.theta[start:], self.grad[start:], self.step_size[start:])
        self.Q = self.QT.T  # (C, R); every B_k starts at 0: training starts at the base
        self.M = np.empty((C, W), dtype=np.float32)  # (C, W) [ΔWᵀ | I] = Q P
        self.G = np.empty((C, W), dtype=np.float32)  # (C, W) gradient wrt M
        self.forward = self._forward_phase()
        self.backward, self.update = self._training_phases()
        self.refresh()

    def _split(self, flat):
        R, W, C = self.R, self.W, self.n_classes
        return flat[: R * W].reshape(R, W), flat[R * W :].reshape(R, C)

    def _blocks(self):
        """(rows, cols) of each A_kᵀ in P; the same rows of Qᵀ hold B_k."""
        row, col = self.n_classes, 0
        for d in self.in_dims:
            yield slice(row, row + self.rank), slice(col, col + d)
            row, col = row + self.rank, col + d

    def refresh(self):
        self.Q.dot(self.P, self.M)  # (C, W) = (C, R) @ (R, W)

    def _training_phases(self):
        """backward(v) and update(): the factors' gradients and their SGD step."""
        C, G, GT = self.n_classes, self.G, self.G.T
        Q, P, M = self.Q, self.P, self.M
        P_tr, QT_tr, gP_tr, gQT_tr = self.P[C:], self.QT[C:], self.gP[C:], self.gQT[C:]
        theta, grad, step_size = self.step
        subtract, multiply = np.subtract, np.multiply

        def backward(v: BatchViews):
            x, _, _, gT, _, _ = v
            gT.dot(x, G)  # (C, W) = (C, b) @ (b, W): gradient wrt M
            # rows that train only: the identities get no gradient
            P_tr.dot(GT, gQT_tr)  # (KR, C) = (KR, W) @ (W, C): wrt the B_k
            QT_tr.dot(G, gP_tr)  # (KR, W) = (KR, C) @ (C, W): wrt the A_kᵀ
            multiply(grad, step_size, grad)  # × lr/batch/2ᵏ; 0 off the blocks: x_k → A_k only
            return v

        def update(_views=None):
            subtract(theta, grad, theta)  # every factor in one step
            Q.dot(P, M)  # (C, W) = (C, R) @ (R, W): refresh

        return backward, update

    # ----------------------------------------------------------------- factors
    def factors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(A_k (d_k, rank), B_k (rank, C))] per adapted layer, as copies."""
        return [(self.P[r, c].T.copy(), self.QT[r].copy()) for r, c in self._blocks()]

    def gradients(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The last backward's steps per adapted layer, shaped like factors()."""
        return [(self.gP[r, c].T.copy(), self.gQT[r].copy()) for r, c in self._blocks()]

    def assign(self, factors):
        """Set every (A_k, B_k); shapes must match factors()."""
        blocks = list(zip(self._blocks(), factors, strict=True))
        for (r, c), (A, B) in blocks:  # all checked before any is written
            if A.shape != self.P[r, c].T.shape or B.shape != self.QT[r].shape:
                raise ValueError(f"factor shapes {A.shape}, {B.shape} do not fit the adapter")
        for (r, c), (A, B) in blocks:
            self.P[r, c], self.QT[r] = A.T, B
        self.refresh()

    @property
    def trainable_params(self) -> int:
        return sum(d * self.rank + self.rank * self.n_classes for d in self.in_dims)
