"""Coordinate-wise median of the effective ΔW (Yin et al., "Byzantine-robust distributed
learning: towards optimal statistical rates", ICML 2018): unweighted, so a device that claims
many samples gains nothing, and a minority of arbitrary reports cannot move any coordinate past
the honest ones. Exact for ΔW (it works on the products), at an accuracy cost on honest fleets
(measured on the federation benchmark: docs/benchmarks.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregation.arrays import deltas_as_arrays, per_coordinate
from coordinator.aggregation.base import AggregationStrategy, FitResult


class CoordinateMedianStrategy(AggregationStrategy):
    name = "coordinate-median"

    def _combine(self, results: Sequence[FitResult], weights: np.ndarray) -> dict[str, np.ndarray]:
        reports = [r.arrays for r in results]
        return deltas_as_arrays(
            [per_coordinate(reports, self.shape, k, _median) for k in self.shape.layers]
        )


def _median(stack: np.ndarray) -> np.ndarray:
    median: np.ndarray = np.median(stack, axis=0, overwrite_input=True)
    return median
