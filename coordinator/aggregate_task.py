"""Aggregating a closed round: the pure function a Ray task runs, and the in-process runner.

Each round runs the configured strategy and its comparison (exact-delta and naive FedAvg), so
the round record can say how far the naive average would have been from the exact one. The
Ray runner (coordinator.ray_runtime.RayAggregator) submits run_strategies as one task a round
(one worker reads the round's reports once, and runs the strategies one after the other);
LocalAggregator runs it inline for tests and tools. Both return the same StrategyRun values.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from coordinator.aggregation import (
    STRATEGIES,
    AdapterShape,
    AggregateResult,
    AggregationError,
    FitFailure,
    FitResult,
)
from coordinator.aggregation.validation import CheckedRound, check_round

COMPARED_ALGORITHMS = ("exact-delta", "naive-fedavg")


@dataclass(frozen=True)
class AggregationRequest:
    round_id: str
    cohort: str
    base_model_hash: str
    shape: AdapterShape
    results: tuple[FitResult, ...]
    failures: tuple[FitFailure, ...]
    parent_version: int | None
    cluster: str = "all"

    @property
    def key(self) -> str:
        """One aggregation per cluster of a round."""
        return f"{self.round_id}/{self.cluster}"


@dataclass(frozen=True)
class StrategyRun:
    algorithm: str
    seconds: float
    result: AggregateResult | None = None
    error: str | None = None


@dataclass(frozen=True)
class AggregationOutcome:
    request: AggregationRequest
    runs: tuple[StrategyRun, ...]

    def run(self, algorithm: str) -> StrategyRun | None:
        return next((r for r in self.runs if r.algorithm == algorithm), None)


def run_strategy(
    algorithm: str,
    shape: AdapterShape,
    results: Sequence[FitResult],
    failures: Sequence[FitFailure],
    checked: CheckedRound | AggregationError | None = None,
) -> StrategyRun:
    """One strategy over one round; an unaggregatable round is an answer, not an exception.
    `checked`: the round's check (or the error it raised) when the caller made it already."""
    started = time.perf_counter()
    try:
        if isinstance(checked, AggregationError):  # the round's check refused it already
            return StrategyRun(algorithm, time.perf_counter() - started, error=str(checked))
        if checked is None:
            checked = check_round(results, failures, shape)
        result = STRATEGIES[algorithm](shape).aggregate_checked(results, failures, checked)
    except AggregationError as err:
        return StrategyRun(algorithm, time.perf_counter() - started, error=str(err))
    return StrategyRun(algorithm, time.perf_counter() - started, result=result)


def run_strategies(
    algorithms: Sequence[str],
    shape: AdapterShape,
    results: Sequence[FitResult],
    failures: Sequence[FitFailure],
) -> tuple[StrategyRun, ...]:
    """Each strategy over the same inputs, in order; each one's answer stands on its own. The
    round is checked once for all of them (the first strategy's time includes the check)."""
    started = time.perf_counter()
    checked: CheckedRound | AggregationError
    try:
        checked = check_round(results, failures, shape)
    except AggregationError as err:
        # without its traceback: it would hold this frame, the round's reports in it, in a
        # cycle only the collector frees
        checked = err.with_traceback(None)
    check_s = time.perf_counter() - started
    runs = [run_strategy(a, shape, results, failures, checked) for a in algorithms]
    if runs:
        runs[0] = replace(runs[0], seconds=runs[0].seconds + check_s)
    return tuple(runs)


def algorithms_for(chosen: str) -> tuple[str, ...]:
    """The chosen strategy first, then the others compared with it."""
    return (chosen, *(a for a in COMPARED_ALGORITHMS if a != chosen))


class Aggregator(Protocol):
    def submit(self, request: AggregationRequest, algorithms: Sequence[str]) -> None: ...

    def collect(self) -> list[AggregationOutcome]:
        """Outcomes of every submitted round that finished since the last call."""
        ...

    def pending(self) -> set[str]:
        """Keys (AggregationRequest.key) submitted and not collected yet."""
        ...


class LocalAggregator:
    """Runs strategies inline, in submit()."""

    def __init__(self) -> None:
        self._done: list[AggregationOutcome] = []

    def submit(self, request: AggregationRequest, algorithms: Sequence[str]) -> None:
        runs = run_strategies(algorithms, request.shape, request.results, request.failures)
        self._done.append(AggregationOutcome(request, runs))

    def collect(self) -> list[AggregationOutcome]:
        done, self._done = self._done, []
        return done

    def pending(self) -> set[str]:
        return {outcome.request.key for outcome in self._done}
