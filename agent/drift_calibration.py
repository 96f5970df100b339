"""Drift calibration of a base model, computed once at pre-training time (never on a device).

- Statistics of the last hidden layer x3 (per-unit mean and std, and the precision matrix of
  the Ledoit-Wolf shrunk covariance, agent/drift.py) over the reference rows: the rows the
  model was pre-trained on. They are many (a 96 x 96 covariance needs them: from the 384
  held-out rows of the fan fleet, distances on other held-out rows of the same recordings
  came out 1.4-3.6 times the in-sample 0.99 quantile, and cross-fitting on so few rows
  overshot by as much the other way), and in-distribution by definition.
- Thresholds: the `quantile` of each window score over windows of in-distribution rows the
  pre-training did NOT use (held out: a model is more certain, and its features more typical,
  on rows it was trained on), drawn as a device sees them: `window_rows` contiguous rows of
  one stream (a recording, a person) in time order, wrapping round at its end (a simulated
  device's sensor replays its data in a loop), one window every `stride` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.drift import (
    WINDOW_ROWS,
    mean_feature_distance,
    mean_max_softmax_gap,
    shrunk_covariance,
)
from agent.trainer.calibration import DriftCalibration
from agent.trainer.model import FrozenFeatureModel

QUANTILE = 0.99
STRIDE_ROWS = 16
# A unit that (nearly) never varies in-distribution would turn noise into huge signature
# entries: its std is floored at this share of the median unit's.
STD_FLOOR_SHARE = 0.1


def fit_calibration(model: FrozenFeatureModel, reference: np.ndarray,
                    held_out: Sequence[np.ndarray], *,
                    window_rows: int = WINDOW_ROWS, quantile: float = QUANTILE,
                    stride: int = STRIDE_ROWS) -> DriftCalibration:  # fmt: skip
    """The calibration of `model`: statistics of x3 on the `reference` rows (the pre-training
    rows), thresholds over windows of the `held_out` in-distribution streams."""
    held_out = [np.asarray(s, dtype=np.float32) for s in held_out if len(s)]
    if len(reference) < 2 or not held_out:
        raise ValueError("calibration needs reference rows (at least 2) and held-out rows")
    if window_rows < 1 or stride < 1:
        raise ValueError("window_rows and stride must be >= 1")
    xs, _ = model.frozen_features(np.asarray(reference, dtype=np.float32))
    mean, std, precision = last_hidden_statistics(xs[-1])  # the last layer's input
    confidence, feature = [], []
    for stream in held_out:
        taps, z = model.frozen_features(stream)  # logits z (n_s, C)
        h = taps[-1]  # the last layer's input (n_s, H)
        for w in cyclic_windows(len(stream), window_rows, stride):
            confidence.append(mean_max_softmax_gap(z[w]))
            feature.append(mean_feature_distance(h[w], mean, precision))
    return DriftCalibration(
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        precision=precision.astype(np.float32),
        confidence_threshold=_positive_quantile(confidence, quantile, "confidence"),
        feature_threshold=_positive_quantile(feature, quantile, "feature"),
        window_rows=window_rows,
        quantile=quantile,
        reference_rows=len(reference),
        held_out_rows=sum(len(s) for s in held_out),
        windows=len(confidence),
    )


def last_hidden_statistics(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (H,), floored std (H,), precision (H, H)) of activations h (n, H)."""
    h = np.asarray(h, dtype=np.float64)  # (n, H)
    mean = h.mean(axis=0)  # (H,)
    std = h.std(axis=0)  # (H,)
    floor = STD_FLOOR_SHARE * float(np.median(std))
    std = np.maximum(std, floor if floor > 0 else 1e-6)  # (H,)
    covariance, _ = shrunk_covariance(h)  # (H, H)
    return mean, std, np.linalg.inv(covariance)


def cyclic_windows(n_rows: int, window_rows: int, stride: int) -> list[np.ndarray]:
    """Row indices of windows of `window_rows` contiguous rows, one starting every `stride`
    rows, wrapping round the end of a stream of `n_rows` (as a replaying sensor does)."""
    if n_rows < 1:
        return []
    offsets = np.arange(window_rows)  # (W,)
    return [(start + offsets) % n_rows for start in range(0, n_rows, stride)]


def _positive_quantile(values: list[float], quantile: float, what: str) -> float:
    threshold = float(np.quantile(values, quantile))
    if not threshold > 0:
        raise ValueError(f"every in-distribution window has a {what} score of 0: no threshold")
    return threshold
