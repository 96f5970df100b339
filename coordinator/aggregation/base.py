"""What every aggregation strategy shares: the round's inputs/outputs and the two phases.

Named after Flower's Strategy (configure_fit / aggregate_fit) so the shape is familiar, but over
plain values: the MQTT bridge turns reports into FitResult and instructions into job commands.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from coordinator.aggregation.arrays import AdapterShape, Arrays
from coordinator.aggregation.validation import CheckedRound, check_round


@dataclass(frozen=True)
class FitResult:
    """One device's fine-tuned adapter (wire names) and the number of samples it trained on."""

    device_id: str
    arrays: Arrays
    num_samples: int
    # These very arrays passed validate_fit_result, values included, when their report arrived
    # (coordinator.reports): a round's check does not read their values again.
    checked_on_receipt: bool = False


@dataclass(frozen=True)
class FitFailure:
    """A device asked to fine-tune that produced nothing usable (failed, timed out, invalid)."""

    device_id: str
    reason: str


@dataclass(frozen=True)
class FitInstruction:
    """What one device is told for a round: the adapter to start from (None: the base model)."""

    device_id: str
    round_id: str
    algorithm: str
    start_arrays: dict[str, np.ndarray] | None


@dataclass(frozen=True)
class AggregateResult:
    algorithm: str
    arrays: dict[str, np.ndarray]
    device_ids: tuple[str, ...]
    weights: Mapping[str, float]
    num_samples: int
    failures: tuple[FitFailure, ...] = field(default=())

    @property
    def failed_device_ids(self) -> tuple[str, ...]:
        return tuple(f.device_id for f in self.failures)


class AggregationStrategy(ABC):
    name: ClassVar[str]
    # Averaging factors position by position only makes sense when every device has the same rank.
    requires_same_rank: ClassVar[bool] = False

    def __init__(self, shape: AdapterShape) -> None:
        self.shape = shape

    def configure_round(
        self,
        round_id: str,
        device_ids: Sequence[str],
        fleet_arrays: Arrays | None = None,
    ) -> dict[str, FitInstruction]:
        """Every device starts from the current fleet adapter (or the base model if none)."""
        start = None if fleet_arrays is None else dict(fleet_arrays)
        return {device: FitInstruction(device, round_id, self.name, start) for device in device_ids}

    def aggregate_fit(
        self, results: Sequence[FitResult], failures: Sequence[FitFailure] = ()
    ) -> AggregateResult:
        return self.aggregate_checked(results, failures, check_round(results, failures, self.shape))

    def aggregate_checked(
        self, results: Sequence[FitResult], failures: Sequence[FitFailure], checked: CheckedRound
    ) -> AggregateResult:
        """aggregate_fit over a round already checked (check_round): several strategies over
        one round validate it once."""
        checked.require_for(results, self.shape)
        if self.requires_same_rank:
            checked.require_same_rank()
        weights = checked.weights
        return AggregateResult(
            algorithm=self.name,
            arrays=self._combine(results, weights),
            device_ids=tuple(r.device_id for r in results),
            weights={r.device_id: float(w) for r, w in zip(results, weights, strict=True)},
            num_samples=sum(r.num_samples for r in results),
            failures=tuple(failures),
        )

    @abstractmethod
    def _combine(self, results: Sequence[FitResult], weights: np.ndarray) -> dict[str, np.ndarray]:
        """Validated results and their weights p_i (summing to 1) -> the aggregate arrays."""
