"""Label-free drift scores for the heartbeat.

1. BN1 z-score: BN1's running mean/var describe the first layer's pre-activations the base
   model saw in pre-training (FC1's units; a CNN's first conv channels at every pixel). For
   recent inputs, the mean squared z-score of those pre-activations against them is about 1 on
   pre-training-like data and grows as the inputs drift (a shift of s standard deviations adds
   about s²). No labels needed; the model computes its own (`bn1_pre_activations`).
2. Prediction entropy, normalised to [0, 1] by log(C): a model unsure of its predictions.

Pure functions on arrays, plus a small ring buffer of recent inputs they are computed on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

BN_EPS = 1e-5


def bn_mean_squared_z(
    pre_activations: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = BN_EPS,
) -> float:
    """Mean over rows and units of (h − μ)² / (σ² + eps); ≈ 1 when h matches BN's statistics."""
    h = np.asarray(pre_activations, dtype=np.float64)
    if (
        h.ndim != 2
        or h.shape[1] != running_mean.shape[0]
        or running_var.shape != running_mean.shape
    ):
        raise ValueError(
            f"pre-activations {h.shape} do not match BN statistics {running_mean.shape}"
        )
    if h.shape[0] == 0:
        raise ValueError("no rows to score")
    z2 = (h - running_mean) ** 2 / (running_var.astype(np.float64) + eps)
    return float(z2.mean())


def mean_normalized_entropy(logits: np.ndarray) -> float:
    """Mean prediction entropy over rows, divided by log(C): 0 certain, 1 uniform."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (n >= 1, C >= 2), got {logits.shape}")
    shifted = logits - logits.max(axis=1, keepdims=True)  # stable softmax
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return float(entropy.mean() / np.log(logits.shape[1]))


class RecentInputs:
    """The last `capacity` input rows seen (a ring buffer), thread-safe."""

    def __init__(self, capacity: int, n_features: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._rows = np.zeros((capacity, n_features), dtype=np.float32)
        self._next = 0
        self._count = 0
        self._lock = threading.Lock()

    def add(self, X: np.ndarray) -> None:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self._rows.shape[1]:
            raise ValueError(f"rows must be (n, {self._rows.shape[1]}), got {X.shape}")
        capacity = len(self._rows)
        with self._lock:
            for row in X[-capacity:]:  # older rows would be overwritten anyway
                self._rows[self._next] = row
                self._next = (self._next + 1) % capacity
            self._count = min(capacity, self._count + len(X))

    def snapshot(self) -> np.ndarray:
        """A copy of the rows held, oldest first."""
        with self._lock:
            if self._count < len(self._rows):
                return self._rows[: self._count].copy()
            return np.concatenate([self._rows[self._next :], self._rows[: self._next]])

    def __len__(self) -> int:
        with self._lock:
            return self._count


@dataclass(frozen=True)
class DriftScores:
    bn1_mean_squared_z: float
    prediction_entropy: float
    rows: int


def score_recent(model, recent: np.ndarray, logits: np.ndarray) -> DriftScores:
    """Both scores on the same rows; `logits` are the model's (with its adapter) on `recent`.

    `model`: a base model (MLP or CNN), whose `bn1_pre_activations(X)` gives the first layer's
    pre-activations as rows with BN1's running mean and variance."""
    pre, running_mean, running_var = model.bn1_pre_activations(recent)
    return DriftScores(
        bn1_mean_squared_z=bn_mean_squared_z(pre, running_mean, running_var),
        prediction_entropy=mean_normalized_entropy(logits),
        rows=len(recent),
    )
