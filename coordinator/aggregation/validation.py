"""The one gate every report passes before it is aggregated.

Refuses rather than repairs: a wrong shape is never broadcast, a NaN never averaged, a sample count
never guessed. Every error names the device, so the bridge can turn it into a FitFailure for that
device and aggregate the others (validate_fit_result is meant to be called on receipt too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from coordinator.aggregation.arrays import (
    AdapterShape,
    a_name,
    b_name,
    chunk_length,
    delta_chunks,
    delta_name,
    effective_deltas,
)
from shared.protocol.checks import ADAPTER_VALUE_BOUND

if TYPE_CHECKING:
    from coordinator.aggregation.base import FitFailure, FitResult


class AggregationError(ValueError):
    """A round or a report that cannot be aggregated; the message names the device."""


def validate_fit_result(
    result: FitResult, shape: AdapterShape, *, values: bool = True
) -> tuple[int, ...] | None:
    """Checks one report; returns its per-layer ranks, or None if it carries deltas only.
    values=False leaves out the checks of its values, its arrays' and its ΔW_k's (check_round
    checks a whole round's values at once)."""
    device = result.device_id
    _check_sample_count(device, result.num_samples)
    names = set(result.arrays)
    unknown = names - shape.factor_names() - shape.delta_names()
    if unknown:
        raise AggregationError(f"device {device}: unknown adapter arrays {sorted(unknown)}")
    if not names:
        raise AggregationError(f"device {device}: report carries no adapter arrays")
    for family in (shape.factor_names(), shape.delta_names()):
        present = names & family
        if present and present != family:
            missing = sorted(family - present)
            raise AggregationError(f"device {device}: incomplete adapter, missing {missing}")
    for name in sorted(names):
        _check_array(device, name, result.arrays[name], values)
    if delta_name(1) in names:
        for k in shape.layers:
            _check_shape(device, delta_name(k), result.arrays[delta_name(k)], shape.delta_shape(k))
    if a_name(1) not in names:
        return None
    ranks = tuple(_check_factor_pair(device, result, shape, k) for k in shape.layers)
    if values:
        for k, delta in zip(shape.layers, effective_deltas(result.arrays, shape), strict=True):
            check_bound(device, f"ΔW{k}", delta)  # bounded factors can still multiply past it
    return ranks


@dataclass(frozen=True)
class CheckedRound:
    """A round that passed the gate: its devices in order, their weights and per-layer ranks.

    Strategies run over the same round take it instead of validating every report again (each
    validation computes every report's ΔW for its bound: three strategies a round made the
    aggregation task validate 3 times, 1.2 of its 1.6 CPU-s at 3,000 reports)."""

    shape: AdapterShape
    device_ids: tuple[str, ...]
    weights: np.ndarray
    ranks: dict[str, tuple[int, ...] | None]

    def require_same_rank(self) -> None:
        _check_same_rank(self.ranks)

    def require_for(self, results: Sequence[FitResult], shape: AdapterShape) -> None:
        """Refuses a check of another round or shape (a caller's mistake, not a device's)."""
        if shape != self.shape or tuple(r.device_id for r in results) != self.device_ids:
            raise ValueError("this CheckedRound was made for other results or another shape")


def check_round(
    results: Sequence[FitResult], failures: Sequence[FitFailure], shape: AdapterShape
) -> CheckedRound:
    """Checks a whole round once; its weights are p_i = n_i / Σ n in the order of results."""
    if not results:
        failed = ", ".join(f"{f.device_id} ({f.reason})" for f in failures) or "none"
        raise AggregationError(f"empty round: no device returned an adapter; failed: {failed}")
    _check_unique_devices(results, failures)
    ranks = {r.device_id: validate_fit_result(r, shape, values=False) for r in results}
    # Values and ΔW bounds of the reports not checked on receipt (at 10,000 reports checked on
    # receipt: ~0.3 of the round check's ~0.4 s of the actor's CPU, its shapes the rest)
    unchecked = [r for r in results if not r.checked_on_receipt]
    _check_values(unchecked)
    _check_product_bounds([r for r in unchecked if ranks[r.device_id] is not None], shape)
    counts = np.array([r.num_samples for r in results], dtype=np.float64)
    weights: np.ndarray = counts / counts.sum()
    return CheckedRound(shape, tuple(r.device_id for r in results), weights, ranks)


def validate_round(
    results: Sequence[FitResult],
    failures: Sequence[FitFailure],
    shape: AdapterShape,
    *,
    same_rank: bool = False,
) -> np.ndarray:
    """Checks a whole round; returns the weights p_i = n_i / Σ n in the order of results."""
    checked = check_round(results, failures, shape)
    if same_rank:
        checked.require_same_rank()
    return checked.weights


def _check_values(results: Sequence[FitResult]) -> None:
    """_check_array's value check on every array of every report, the arrays of one name and
    shape a chunk of reports at a time (one reduction per report and array cost more than
    the rest of a round's check: ~0.5 s of CPU at 10,000 reports)."""
    carriers: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, result in enumerate(results):
        for name, array in result.arrays.items():
            carriers.setdefault((name, array.shape), []).append(i)
    for (name, array_shape), indices in carriers.items():
        axes = tuple(range(1, len(array_shape) + 1))
        step = chunk_length(8 * int(np.prod(array_shape)))  # |values| in float64, a chunk
        for begin in range(0, len(indices), step):
            part = indices[begin : begin + step]
            stacked = np.stack([results[i].arrays[name] for i in part])
            for j in _beyond_bound(stacked, axes):
                result = results[part[j]]
                _check_array(result.device_id, name, result.arrays[name])
                raise AggregationError(f"device {result.device_id}: {name} is out of bounds")


def _check_product_bounds(results: Sequence[FitResult], shape: AdapterShape) -> None:
    """validate_fit_result's bound on every report's ΔW_k, a chunk of reports at a time."""
    reports = [r.arrays for r in results]
    for k in shape.layers:
        for begin, deltas in delta_chunks(reports, shape, k):
            for i in _beyond_bound(deltas, (1, 2)):
                device = results[begin + i].device_id
                check_bound(device, f"ΔW{k}", deltas[i])
                raise AggregationError(f"device {device}: ΔW{k} contains NaN or infinite values")


def _beyond_bound(stacked: np.ndarray, axes: tuple[int, ...]) -> list[int]:
    """Positions along the first axis whose largest |value| is past ADAPTER_VALUE_BOUND (or
    NaN: it fails the comparison too)."""
    largest = np.abs(stacked).max(axis=axes, initial=0.0)
    return [int(i) for i in np.flatnonzero(~(largest <= ADAPTER_VALUE_BOUND))]


def _check_sample_count(device: str, num_samples: object) -> None:
    # bool is an int subclass; True samples is a bug upstream, not a count.
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
        raise AggregationError(f"device {device}: sample count must be an int, got {num_samples!r}")
    if num_samples <= 0:
        raise AggregationError(f"device {device}: sample count must be > 0, got {num_samples}")


def _check_array(device: str, name: str, array: object, values: bool = True) -> None:
    if not isinstance(array, np.ndarray):
        raise AggregationError(f"device {device}: {name} is {type(array).__name__}, not an array")
    if array.dtype.kind != "f":
        raise AggregationError(f"device {device}: {name} has dtype {array.dtype}, not float")
    if not values:
        return
    # One reduction for both checks (a NaN or an infinity makes the largest |value| fail the
    # bound too); the finite check runs only to name what failed.
    largest = float(np.abs(array).max(initial=0.0))
    if largest <= ADAPTER_VALUE_BOUND:
        return
    if not np.isfinite(array).all():
        raise AggregationError(f"device {device}: {name} contains NaN or infinite values")
    check_bound(device, name, array)


def check_bound(device: str, name: str, array: np.ndarray) -> None:
    """|values| <= ADAPTER_VALUE_BOUND: a huge but finite report is refused, not averaged."""
    largest = float(np.abs(array).max(initial=0.0))
    if largest > ADAPTER_VALUE_BOUND:
        raise AggregationError(
            f"device {device}: {name} holds {largest:.3g}, beyond the bound {ADAPTER_VALUE_BOUND:g}"
        )


def _check_shape(device: str, name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if array.shape != expected:
        raise AggregationError(
            f"device {device}: {name} has shape {array.shape}, expected {expected}"
        )


def _check_factor_pair(device: str, result: FitResult, shape: AdapterShape, layer: int) -> int:
    a = result.arrays[a_name(layer)]
    b = result.arrays[b_name(layer)]
    if a.ndim != 2 or a.shape[0] != shape.input_dim(layer) or a.shape[1] < 1:
        expected = f"({shape.input_dim(layer)}, R)"
        raise AggregationError(
            f"device {device}: {a_name(layer)} has shape {a.shape}, expected {expected}"
        )
    rank = int(a.shape[1])
    _check_shape(device, b_name(layer), b, (rank, shape.n_classes))
    return rank


def _check_unique_devices(results: Sequence[FitResult], failures: Sequence[FitFailure]) -> None:
    counts = Counter(r.device_id for r in results)
    duplicated = sorted(d for d, n in counts.items() if n > 1)
    if duplicated:
        raise AggregationError(f"devices reported twice in one round: {_some(duplicated)}")
    both = sorted(set(counts) & {f.device_id for f in failures})
    if both:
        raise AggregationError(f"devices listed both as result and as failure: {_some(both)}")


def _check_same_rank(ranks: dict[str, tuple[int, ...] | None]) -> None:
    without = sorted(d for d, r in ranks.items() if r is None)
    if without:
        raise AggregationError(f"devices {_some(without)}: no A/B factors to average")
    reference_device, reference = next(iter(ranks.items()))
    for device, rank in ranks.items():
        if rank != reference:
            raise AggregationError(
                f"device {device}: ranks {rank} differ from {reference_device}'s {reference}"
            )


# Devices an error names at most: a round's error is stored with it and shown by the API (every
# id of a 10,000-device round made one 89 KB string).
NAMED_DEVICES_MAX = 10


def _some(devices: list[str]) -> str:
    """The first few of a sorted list of device ids, and how many more."""
    if len(devices) <= NAMED_DEVICES_MAX:
        return str(devices)
    more = len(devices) - NAMED_DEVICES_MAX
    return f"{devices[:NAMED_DEVICES_MAX]} and {more:,} more"
