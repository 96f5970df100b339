"""Personalised adapters beside the fleet one: each device keeps its own effective ΔW.

The fleet adapter is the exact sample-weighted aggregate (as exact-delta); a device whose data
drifted its own way can run its personal ΔW, or a mix alpha·personal + (1 − alpha)·fleet that keeps
what the fleet learned while staying close to its own data (alpha = 1: personal, 0: fleet).

State (the fleet deltas and one ΔW set per device) lives in memory; construct with fleet= and
personal= to restore it, and read it back with fleet_arrays / personal_adapters() to persist it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from coordinator.aggregation.arrays import (
    AdapterShape,
    Arrays,
    deltas_as_arrays,
    effective_deltas,
)
from coordinator.aggregation.base import (
    AggregateResult,
    FitFailure,
    FitInstruction,
    FitResult,
)
from coordinator.aggregation.exact_delta import ExactDeltaStrategy
from coordinator.aggregation.validation import AggregationError, validate_fit_result


class PersonalizedStrategy(ExactDeltaStrategy):
    # The fleet adapter is the exact aggregate; on top, each device's own ΔW is kept.
    name = "personalized"

    def __init__(
        self,
        shape: AdapterShape,
        *,
        alpha: float = 0.5,
        fleet: Arrays | None = None,
        personal: Mapping[str, Arrays] | None = None,
    ) -> None:
        super().__init__(shape)
        self.alpha = _check_alpha(alpha)
        self._fleet = None if fleet is None else self._as_deltas("fleet", fleet)
        self._personal = {d: self._as_deltas(d, a) for d, a in (personal or {}).items()}

    @property
    def fleet_arrays(self) -> dict[str, np.ndarray] | None:
        return None if self._fleet is None else dict(self._fleet)

    def personal_adapters(self) -> dict[str, dict[str, np.ndarray]]:
        return {device: dict(arrays) for device, arrays in self._personal.items()}

    def personal_adapter(self, device_id: str) -> dict[str, np.ndarray] | None:
        arrays = self._personal.get(device_id)
        return None if arrays is None else dict(arrays)

    def adapter_for(
        self, device_id: str, alpha: float | None = None
    ) -> dict[str, np.ndarray] | None:
        """alpha·personal + (1 − alpha)·fleet as deltas; whichever exists if only one does."""
        alpha = self.alpha if alpha is None else _check_alpha(alpha)
        personal = self._personal.get(device_id)
        if personal is None or self._fleet is None:
            chosen = personal if personal is not None else self._fleet
            return None if chosen is None else dict(chosen)
        return {
            name: (alpha * personal[name] + (1.0 - alpha) * self._fleet[name]).astype(np.float32)
            for name in self._fleet
        }

    def configure_round(
        self,
        round_id: str,
        device_ids: Sequence[str],
        fleet_arrays: Arrays | None = None,
    ) -> dict[str, FitInstruction]:
        if fleet_arrays is not None:
            self._fleet = self._as_deltas("fleet", fleet_arrays)
        return {
            device: FitInstruction(device, round_id, self.name, self.adapter_for(device))
            for device in device_ids
        }

    def aggregate_fit(
        self, results: Sequence[FitResult], failures: Sequence[FitFailure] = ()
    ) -> AggregateResult:
        aggregate = super().aggregate_fit(results, failures)
        self._fleet = dict(aggregate.arrays)
        for result in results:
            self._personal[result.device_id] = deltas_as_arrays(
                effective_deltas(result.arrays, self.shape)
            )
        return aggregate

    def _as_deltas(self, owner: str, arrays: Arrays) -> dict[str, np.ndarray]:
        """Any adapter form (deltas and/or factors), checked, folded into its effective deltas."""
        validate_fit_result(FitResult(owner, arrays, num_samples=1), self.shape)
        return deltas_as_arrays(effective_deltas(arrays, self.shape))


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise AggregationError(f"alpha must be in [0, 1], got {alpha}")
    return float(alpha)
