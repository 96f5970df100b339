"""Per-feature standardisation fitted on pre-training data and reused unchanged on every device.

The statistics belong to the pre-trained model (a device must scale its own windows exactly as
the pre-training set was scaled), so they travel as two named arrays, like the model's weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from agent.data.dataset import Dataset, check_finite
from agent.data.errors import DataError

# A feature whose spread is below this is (nearly) constant in the fitting set: dividing by its
# spread would blow up noise on new data, so it is only centred.
MIN_SCALE = 1e-6


# eq=False: arrays make `==` ambiguous.
@dataclass(frozen=True, eq=False)
class Standardizer:
    """x -> (x - mean) / scale per feature. mean, scale: float32 (d,)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        """Mean and standard deviation of each column of X (n, d), n >= 1."""
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"fit needs a non-empty (n, d) array, got shape {X.shape}")
        X64 = X.astype(np.float64)  # (n, d); float64 so large n does not lose the mean
        std = X64.std(axis=0)  # (d,)
        scale = np.where(std > MIN_SCALE, std, 1.0)  # (d,)
        return cls(X64.mean(axis=0).astype(np.float32), scale.astype(np.float32))

    def apply(self, X: np.ndarray) -> np.ndarray:
        """float32 (n, d) standardised copy of X (n, d)."""
        if X.ndim != 2 or X.shape[1] != len(self.mean):
            raise ValueError(f"expected (n, {len(self.mean)}) features, got shape {X.shape}")
        return ((X - self.mean) / self.scale).astype(np.float32)  # (n, d)

    def apply_to(self, dataset: Dataset) -> Dataset:
        """The dataset with standardised X; meta['standardizer'] records the scaling used."""
        meta = {**dataset.meta, "standardizer": self}
        return Dataset(self.apply(dataset.X), dataset.y, dataset.n_classes, meta)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"feature_mean": self.mean.copy(), "feature_scale": self.scale.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, source: str = "") -> Standardizer:
        """Inverse of `to_arrays`; checks names, shapes, finiteness and positive scales."""
        where = source or "standardizer arrays"
        missing = [k for k in ("feature_mean", "feature_scale") if k not in arrays]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        mean = np.asarray(arrays["feature_mean"], dtype=np.float32)  # (d,)
        scale = np.asarray(arrays["feature_scale"], dtype=np.float32)  # (d,)
        if mean.ndim != 1 or mean.shape != scale.shape:
            raise DataError(
                f"{where}: feature_mean {mean.shape} and feature_scale {scale.shape} "
                "must be two (d,) arrays"
            )
        check_finite(mean, "feature_mean", source=where)
        check_finite(scale, "feature_scale", source=where)
        if not (scale > 0).all():
            raise DataError(f"{where}: feature_scale must be positive")
        return cls(mean, scale)
