"""FedAvg of A and B separately (and of the frozen deltas): the common but inexact baseline.

Kept for comparison with exact-delta (see compare.aggregation_gap): the product of averages is not
the average of products unless every device shares the same A (or the same B).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregation.arrays import a_name, b_name, chunk_length, delta_name, has_deltas
from coordinator.aggregation.base import AggregationStrategy, FitResult


class NaiveFedAvgStrategy(AggregationStrategy):
    name = "naive-fedavg"
    requires_same_rank = True

    def _combine(self, results: Sequence[FitResult], weights: np.ndarray) -> dict[str, np.ndarray]:
        names = [a_name(k) for k in self.shape.layers] + [b_name(k) for k in self.shape.layers]
        if any(has_deltas(r.arrays) for r in results):
            # A device without deltas started from the base model: its delta is zero.
            names += [delta_name(k) for k in self.shape.layers]
        return {name: self._weighted_mean(name, results, weights) for name in names}

    def _weighted_mean(
        self, name: str, results: Sequence[FitResult], weights: np.ndarray
    ) -> np.ndarray:
        carriers = [(r, w) for r, w in zip(results, weights, strict=True) if name in r.arrays]
        total = np.zeros(carriers[0][0].arrays[name].shape, dtype=np.float64)
        step = chunk_length(8 * total.size)  # a chunk of reports a product, in float64
        for begin in range(0, len(carriers), step):
            part = carriers[begin : begin + step]
            stacked = np.stack([result.arrays[name] for result, _ in part])  # refuses a shape off
            total += np.tensordot(np.array([w for _, w in part]), stacked.astype(np.float64), 1)
        return total.astype(np.float32)
