"""Aggregation strategies for Skip-LoRA adapters: exact (product), naive FedAvg, personalised."""

from coordinator.aggregation.arrays import AdapterShape, effective_deltas
from coordinator.aggregation.base import (
    AggregateResult,
    AggregationStrategy,
    FitFailure,
    FitInstruction,
    FitResult,
)
from coordinator.aggregation.bounds import Bounded, TrustBounds, bound_reports
from coordinator.aggregation.compare import AggregationGap, aggregation_gap
from coordinator.aggregation.coordinate_median import CoordinateMedianStrategy
from coordinator.aggregation.exact_delta import ExactDeltaStrategy
from coordinator.aggregation.naive_fedavg import NaiveFedAvgStrategy
from coordinator.aggregation.trimmed_mean import TrimmedMeanStrategy
from coordinator.aggregation.validation import AggregationError, validate_fit_result

STRATEGIES: dict[str, type[AggregationStrategy]] = {
    cls.name: cls
    for cls in (
        ExactDeltaStrategy,
        NaiveFedAvgStrategy,
        CoordinateMedianStrategy,
        TrimmedMeanStrategy,
    )
}

__all__ = [
    "STRATEGIES",
    "AdapterShape",
    "AggregateResult",
    "AggregationError",
    "AggregationGap",
    "AggregationStrategy",
    "Bounded",
    "CoordinateMedianStrategy",
    "ExactDeltaStrategy",
    "FitFailure",
    "FitInstruction",
    "FitResult",
    "NaiveFedAvgStrategy",
    "TrimmedMeanStrategy",
    "TrustBounds",
    "aggregation_gap",
    "bound_reports",
    "effective_deltas",
    "validate_fit_result",
]
