"""What the base model knows about its own in-distribution data, for label-free drift scores.

Computed at pre-training time (agent/drift_calibration.py) and shipped inside the base model
file, so every device scores drift against the same reference: the last hidden layer's
per-unit mean and std (x3, the last layer's input, width H), a shrunk precision matrix for a
Mahalanobis distance, and the thresholds of the two window scores (a high quantile over
in-distribution windows of `window_rows` rows the pre-training did not use). The weights hash
does not cover it: adapters depend on the weights alone.

In the model file: arrays `calibration_mean` (H,), `calibration_std` (H,), `calibration_precision`
(H, H), all float32, and the header's `calibration` object with the scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARRAY_NAMES = ("calibration_mean", "calibration_std", "calibration_precision")
HEADER_KEY = "calibration"


class CalibrationError(ValueError):
    """A calibration that cannot be used: wrong shapes, non-finite values, bad thresholds."""


# eq=False: arrays make `==` ambiguous.
@dataclass(frozen=True, eq=False)
class DriftCalibration:
    mean: np.ndarray  # float32 (H,): in-distribution mean of x3
    std: np.ndarray  # float32 (H,): its spread per unit, > 0 (floored for near-dead units)
    precision: np.ndarray  # float32 (H, H): inverse of the shrunk covariance of x3
    confidence_threshold: float  # mean (1 − max softmax) over a window: the quantile
    feature_threshold: float  # mean squared Mahalanobis distance / H over a window: the quantile
    window_rows: int  # rows per window the thresholds hold for
    quantile: float  # which quantile of the in-distribution windows the thresholds are
    reference_rows: int  # in-distribution rows the statistics come from (pre-training rows)
    held_out_rows: int  # in-distribution rows, not pre-trained on, the windows are drawn from
    windows: int  # in-distribution windows the thresholds come from

    def __post_init__(self) -> None:
        H = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if H < 1 or self.std.shape != (H,) or self.precision.shape != (H, H):
            raise CalibrationError(
                f"shapes mean {self.mean.shape}, std {self.std.shape}, precision "
                f"{self.precision.shape} do not describe one layer of H units"
            )
        for name in ARRAY_NAMES:
            if not np.isfinite(getattr(self, name.removeprefix("calibration_"))).all():
                raise CalibrationError(f"{name} holds NaN or infinity")
        if not (self.std > 0).all():
            raise CalibrationError("calibration_std must be positive")
        for name in ("confidence_threshold", "feature_threshold"):
            value = getattr(self, name)
            if not isinstance(value, float) or not math.isfinite(value) or value <= 0:
                raise CalibrationError(f"{name} must be a positive number, got {value!r}")
        if not 0.0 < self.quantile <= 1.0:
            raise CalibrationError(f"quantile must be in (0, 1], got {self.quantile!r}")
        for name in ("window_rows", "reference_rows", "held_out_rows", "windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CalibrationError(f"{name} must be a positive integer, got {value!r}")

    @property
    def width(self) -> int:
        """H: the width of the layer it describes."""
        return int(self.mean.shape[0])

    # ------------------------------------------------------------------ file form
    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "calibration_mean": self.mean.astype(np.float32),
            "calibration_std": self.std.astype(np.float32),
            "calibration_precision": self.precision.astype(np.float32),
        }

    def header(self) -> dict:
        return {
            "confidence_threshold": self.confidence_threshold,
            "feature_threshold": self.feature_threshold,
            "window_rows": self.window_rows,
            "quantile": self.quantile,
            "reference_rows": self.reference_rows,
            "held_out_rows": self.held_out_rows,
            "windows": self.windows,
        }

    @classmethod
    def from_file(cls, header: dict, arrays: dict[str, np.ndarray]) -> DriftCalibration:
        """From the header's `calibration` object and the three arrays; CalibrationError if
        anything is missing or wrong."""
        if not isinstance(header, dict):
            raise CalibrationError("the header's calibration is not an object")
        try:
            return cls(
                mean=np.asarray(arrays["calibration_mean"], dtype=np.float32),
                std=np.asarray(arrays["calibration_std"], dtype=np.float32),
                precision=np.asarray(arrays["calibration_precision"], dtype=np.float32),
                confidence_threshold=float(header["confidence_threshold"]),
                feature_threshold=float(header["feature_threshold"]),
                window_rows=_integer(header["window_rows"]),
                quantile=float(header["quantile"]),
                reference_rows=_integer(header["reference_rows"]),
                held_out_rows=_integer(header["held_out_rows"]),
                windows=_integer(header["windows"]),
            )
        except KeyError as missing:
            raise CalibrationError(f"calibration lacks {missing}") from None
        except (TypeError, ValueError) as error:
            if isinstance(error, CalibrationError):
                raise
            raise CalibrationError(f"calibration value unusable: {error}") from None


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalibrationError(f"expected an integer, got {value!r}")
    return value
