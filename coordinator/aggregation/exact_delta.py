"""Exact aggregation of Skip-LoRA adapters via the product: ΔW_k = Σ_i p_i (delta_ik + A_ik B_ik).

Averaging A and B separately gives (Σ p_i A_i)(Σ p_i B_i), which is not Σ p_i A_i B_i. In Skip-LoRA
every ΔW_k is only d_k × C (C = 3 or 6 classes), so shipping the product is cheap and exact. Devices
then start the next round from these frozen deltas with fresh factors; ranks may differ per device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from coordinator.aggregation.arrays import AdapterShape, delta_chunks, deltas_as_arrays
from coordinator.aggregation.base import AggregationStrategy, FitResult


def weighted_effective_deltas(
    results: Sequence[FitResult], weights: np.ndarray, shape: AdapterShape
) -> list[np.ndarray]:
    """Σ_i p_i ΔW_ik per layer, in float64 (a chunk of reports' ΔW at a time)."""
    if len(weights) != len(results):
        raise ValueError(f"{len(weights)} weights for {len(results)} reports")
    reports = [r.arrays for r in results]
    totals = []
    for k in shape.layers:
        total = np.zeros(shape.delta_shape(k), dtype=np.float64)
        for begin, deltas in delta_chunks(reports, shape, k):
            total += np.tensordot(weights[begin : begin + len(deltas)], deltas, axes=1)
        totals.append(total)
    return totals


class ExactDeltaStrategy(AggregationStrategy):
    name = "exact-delta"

    def _combine(self, results: Sequence[FitResult], weights: np.ndarray) -> dict[str, np.ndarray]:
        return deltas_as_arrays(weighted_effective_deltas(results, weights, self.shape))
