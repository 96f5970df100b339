"""Coordinate-wise trimmed mean of the effective ΔW (Yin et al., ICML 2018): per coordinate, the
largest and the smallest `trim` fraction of the reports are dropped and the rest averaged
(unweighted). At least one from each end once there are three reports; with fewer, the mean."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from coordinator.aggregation.arrays import AdapterShape, deltas_as_arrays, per_coordinate
from coordinator.aggregation.base import AggregationStrategy, FitResult

DEFAULT_TRIM = 0.1


class TrimmedMeanStrategy(AggregationStrategy):
    name = "trimmed-mean"

    def __init__(self, shape: AdapterShape, trim: float = DEFAULT_TRIM) -> None:
        super().__init__(shape)
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def dropped_per_end(self, n: int) -> int:
        if n < 3:
            return 0
        return max(1, math.floor(self.trim * n))

    def _combine(self, results: Sequence[FitResult], weights: np.ndarray) -> dict[str, np.ndarray]:
        k = self.dropped_per_end(len(results))
        reports = [r.arrays for r in results]

        def trimmed(stack: np.ndarray) -> np.ndarray:
            stack.sort(axis=0)  # in place, per coordinate
            kept: np.ndarray = stack[k : len(results) - k].mean(axis=0)
            return kept

        return deltas_as_arrays(
            [per_coordinate(reports, self.shape, layer, trimmed) for layer in self.shape.layers]
        )
