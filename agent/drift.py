"""Label-free drift scores for the heartbeat, over a window of recent inputs.

1. BN1 z-score: BN1's running mean/var describe the first layer's pre-activations the base
   model saw in pre-training (FC1's units; a CNN's first conv channels at every pixel). For
   recent inputs, the mean squared z-score of those pre-activations against them is about 1 on
   pre-training-like data and grows as the inputs drift (a shift of s standard deviations adds
   about s²). No labels needed; the model computes its own (`bn1_pre_activations`).
2. Prediction entropy, normalised to [0, 1] by log(C): a model unsure of its predictions.
3. Confidence: the mean of 1 − max softmax (Hendrycks & Gimpel 2017's baseline), with the
   adapter the device runs: how often, and how much, the model is unsure.
4. Feature distance: the mean squared Mahalanobis distance of the last hidden layer's
   activations h (the last layer's input) from their in-distribution mean, under a shrunk
   precision matrix (Lee et al. 2018 use one per class; one for all needs no labels), / H.
5. Signature: the mean of (h − mean) / std over the window, a vector of width H: where the
   device's inputs sit in the model's feature space (the coordinator clusters on it).
Scores 3 and 4 are sent divided by thresholds calibrated for the base model on its own
in-distribution data (agent/trainer/calibration.py), so 1.0 means "the calibrated threshold".

Pure functions on arrays, plus a small ring buffer of recent inputs they are computed on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from agent.trainer.adapter import Adapter
from agent.trainer.calibration import DriftCalibration
from agent.trainer.model import BaseModel

BN_EPS = 1e-5
WINDOW_ROWS = 256  # the most recent input rows the scores look at (and calibration windows)


def bn_mean_squared_z(
    pre_activations: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = BN_EPS,
) -> float:
    """Mean over rows and units of (h − μ)² / (σ² + eps); ≈ 1 when h matches BN's statistics.

    In the rows' own precision with one temporary, the mean accumulated in float64: a CNN gives
    a row per pixel (256 images × 784 pixels × 16 channels), where float64 copies of every step
    took 93 MB (measured)."""
    h = np.asarray(pre_activations)
    if not np.issubdtype(h.dtype, np.floating):
        h = h.astype(np.float64)
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
    z2 = h - running_mean.astype(h.dtype)  # (n, M), the one temporary
    np.square(z2, out=z2)
    z2 /= (running_var.astype(np.float64) + eps).astype(h.dtype)
    return float(z2.mean(dtype=np.float64))


def mean_normalized_entropy(logits: np.ndarray) -> float:
    """Mean prediction entropy over rows, divided by log(C): 0 certain, 1 uniform."""
    p = softmax(logits)  # (n, C)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1)
    return float(entropy.mean() / np.log(p.shape[1]))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, max-subtracted: finite for any finite logits."""
    z = np.asarray(logits, dtype=np.float64)  # (n, C)
    _check_logits(z)
    e = np.exp(z - z.max(axis=1, keepdims=True))  # (n, C)
    return e / e.sum(axis=1, keepdims=True)  # (n, C)


def mean_max_softmax_gap(logits: np.ndarray) -> float:
    """Mean over rows of 1 − max softmax: 0 when every prediction is certain, 1 − 1/C at most."""
    p = softmax(logits)  # (n, C)
    return float(1.0 - p.max(axis=1).mean())


def mahalanobis_squared(h: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """(h_i − mean)ᵀ P (h_i − mean) per row: (n,)."""
    h = np.asarray(h, dtype=np.float64)  # (n, H)
    if h.ndim != 2 or mean.shape != (h.shape[1],) or precision.shape != (h.shape[1],) * 2:
        raise ValueError(
            f"activations {h.shape} do not match mean {mean.shape} / precision {precision.shape}"
        )
    centred = h - mean  # (n, H)
    return np.einsum("ij,ij->i", centred @ precision, centred)  # (n,) = rows of (n,H)@(H,H) · (n,H)


def mean_feature_distance(h: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> float:
    """Mean squared Mahalanobis distance over rows, / H (≈ 1 for Gaussian in-distribution rows)."""
    if len(h) == 0:
        raise ValueError("no rows to score")
    return float(mahalanobis_squared(h, mean, precision).mean() / h.shape[1])


def feature_signature(h: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Mean over rows of (h − mean) / std: float32 (H,)."""
    h = np.asarray(h, dtype=np.float64)  # (n, H)
    if h.ndim != 2 or len(h) == 0 or mean.shape != (h.shape[1],) or std.shape != mean.shape:
        raise ValueError(f"activations {h.shape} do not match mean {mean.shape} / std {std.shape}")
    return ((h.mean(axis=0) - mean) / std).astype(np.float32)  # (H,): the mean commutes


def shrunk_covariance(h: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf covariance of the rows of h: (1 − a) S + a (tr S / H) I, and a.

    The shrinkage a is Ledoit & Wolf's (2004) estimate of the one minimising the expected
    squared error, so the result is well conditioned even when rows are few or units dead
    (a ReLU unit that never fires has variance 0: S alone is singular).
    """
    h = np.asarray(h, dtype=np.float64)  # (n, H)
    n, H = h.shape
    if n < 2:
        raise ValueError("a covariance needs at least 2 rows")
    x = h - h.mean(axis=0)  # (n, H)
    S = x.T @ x / n  # (H, H) = (H, n) @ (n, H)
    mu = np.trace(S) / H
    target_gap = ((S - mu * np.eye(H)) ** 2).sum() / H  # ‖S − μI‖²/H
    # Σ_i ‖x_i x_iᵀ − S‖² = Σ_i ‖x_i‖⁴ − n ‖S‖² (the cross term sums to n ‖S‖²)
    spread = (((x**2).sum(axis=1) ** 2).sum() - n * (S**2).sum()) / (n * n * H)
    a = 1.0 if target_gap <= 0 else float(min(spread, target_gap) / target_gap)
    return (1.0 - a) * S + a * mu * np.eye(H), a


def _check_logits(logits: np.ndarray) -> None:
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (n >= 1, C >= 2), got {logits.shape}")


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

    @property
    def capacity(self) -> int:
        return len(self._rows)


# eq=False: the signature is an array.
@dataclass(frozen=True, eq=False)
class DriftScores:
    rows: int
    bn1_mean_squared_z: float
    prediction_entropy: float
    confidence: float  # mean (1 − max softmax), not divided by a threshold
    feature: float | None = None  # mean squared Mahalanobis / H (needs a calibration's stats)
    confidence_score: float | None = None  # confidence / its calibrated threshold
    feature_score: float | None = None  # feature / its calibrated threshold
    signature: np.ndarray | None = None  # float32 (H,)


def score_recent(
    model,
    recent: np.ndarray,
    logits: np.ndarray,
    *,
    hidden: np.ndarray | None = None,
    calibration: DriftCalibration | None = None,
) -> DriftScores:
    """Every score on the same rows: `logits` are the model's (with its adapter) on `recent`;
    with `hidden` (the last layer's input on `recent`) and a `calibration`, the calibrated
    scores and signature. `model` is a base model (MLP or CNN): its `bn1_pre_activations(X)`
    gives the first layer's pre-activations as rows, with BN1's running mean and variance."""
    pre, running_mean, running_var = model.bn1_pre_activations(recent)
    scores = DriftScores(
        rows=len(recent),
        bn1_mean_squared_z=bn_mean_squared_z(pre, running_mean, running_var),
        prediction_entropy=mean_normalized_entropy(logits),
        confidence=mean_max_softmax_gap(logits),
    )
    if calibration is None or hidden is None:
        return scores
    mean, std = calibration.mean.astype(np.float64), calibration.std.astype(np.float64)
    feature = mean_feature_distance(hidden, mean, calibration.precision.astype(np.float64))
    return replace(
        scores,
        feature=feature,
        confidence_score=scores.confidence / calibration.confidence_threshold,
        feature_score=feature / calibration.feature_threshold,
        signature=feature_signature(hidden, mean, std),
    )


def score_window(model: BaseModel, rows: np.ndarray, adapter: Adapter | None = None) -> DriftScores:
    """All scores of `model` (running `adapter`) on a window of raw input rows."""
    xs, z = model.frozen_features(rows)  # [x1, .., xK], (n, C)
    logits = z if adapter is None else z + adapter.delta_logits(xs)  # (n, C)
    return score_recent(model, rows, logits, hidden=xs[-1], calibration=model.calibration)
