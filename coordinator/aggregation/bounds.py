"""Bounded trust in reports, before any strategy averages them.

A device on a valid account can still lie: claim 2**62 training samples, or send a huge but
finite adapter. Two bounds, applied to every round whatever the strategy:
- weight: a report counts at most the samples the device registered (its presence), and at most
  `max_weight_ratio` times the median of the *other* reports' counts (leave-one-out: a claim
  cannot raise its own cap);
- update: each report's update (its effective ΔW minus the adapter training started from) is
  clipped to `clip_factor` times the median norm of the round's updates (norm clipping, as in
  Sun et al., "Can you really backdoor federated learning?", 2019). A clipped report's device is
  an outlier: its canary evaluations do not count. The median is over every report, the
  device's own included: two honest sub-groups of a cluster (say, two that drifted further than
  the other two) then do not clip each other, while one update far beyond the rest still is.
Both relative bounds need three reports: with fewer, one peer's figure is no norm. Then the
registered samples, the value bound, the canary and the devices' own hold-outs are what protect
the fleet (docs/coordinator.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coordinator.aggregation.arrays import (
    AdapterShape,
    Arrays,
    delta_chunks,
    deltas_as_arrays,
    effective_deltas,
)
from coordinator.aggregation.base import FitResult


@dataclass(frozen=True)
class TrustBounds:
    max_weight_ratio: float | None = 10.0  # None: no relative cap on a report's weight
    clip_factor: float | None = 4.0  # None: no clipping of updates

    def __post_init__(self) -> None:
        for name in ("max_weight_ratio", "clip_factor"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 1.0):
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")


@dataclass(frozen=True)
class Bounded:
    results: tuple[FitResult, ...]
    notes: Mapping[str, str] = field(default_factory=dict)  # device -> what was bounded
    outliers: frozenset[str] = frozenset()  # devices whose update was clipped


def bound_reports(
    results: Sequence[FitResult],
    *,
    shape: AdapterShape,
    bounds: TrustBounds,
    registered: Mapping[str, int | None],
    start: Arrays | None = None,
) -> Bounded:
    """The reports with weights capped and updates clipped; unbounded ones pass unchanged."""
    notes: dict[str, str] = {}
    samples = _capped_samples(results, registered, bounds.max_weight_ratio, notes)
    start_deltas = _start_deltas(start, shape)
    norms = _update_norms(results, shape, start_deltas)
    bound = _of_all(norms, bounds.clip_factor)
    out, outliers = [], set()
    for i, result in enumerate(results):
        arrays = result.arrays
        if bound is not None and norms[i] > bound:
            scale = bound / norms[i]
            deltas = effective_deltas(arrays, shape)
            clipped = [s + (d - s) * scale for d, s in zip(deltas, start_deltas, strict=True)]
            arrays = deltas_as_arrays(clipped)
            outliers.add(result.device_id)
            notes[result.device_id] = _join(
                notes.get(result.device_id), f"update norm {norms[i]:.3g} clipped to {bound:.3g}"
            )
        checked = result.checked_on_receipt and arrays is result.arrays  # not if clipped
        out.append(FitResult(result.device_id, arrays, samples[i], checked))
    return Bounded(tuple(out), notes, frozenset(outliers))


def _capped_samples(
    results: Sequence[FitResult],
    registered: Mapping[str, int | None],
    ratio: float | None,
    notes: dict[str, str],
) -> list[int]:
    samples = []
    for r in results:
        held = registered.get(r.device_id)
        count = r.num_samples if held is None or held <= 0 else min(r.num_samples, held)
        if count != r.num_samples:
            notes[r.device_id] = f"claimed {r.num_samples} samples, registered {held}"
        samples.append(count)
    capped = []
    limits = leave_one_out_bounds(samples, ratio)
    for i, count in enumerate(samples):
        limit = limits[i]
        if limit is not None and count > limit:
            notes[results[i].device_id] = _join(
                notes.get(results[i].device_id), f"weight {count} capped to {int(limit)}"
            )
            count = max(1, int(limit))
        capped.append(count)
    return capped


MIN_REPORTS = 3  # reports a relative bound needs


def leave_one_out_bounds(values: Sequence[float], factor: float | None) -> list[float | None]:
    """For each i, `factor` times the median of the values other than values[i] (None where
    that median is not positive, or too few others). From one sort: removing the value at
    sorted position p shifts the sorted positions after p down by one, so each median is read
    at fixed positions of the sorted values (a median of the others per report was quadratic:
    50 s of the actor's CPU at 10,000 reports)."""
    n, needed = len(values), MIN_REPORTS - 1
    if factor is None or n - 1 < needed:
        return [None] * n
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    ordered = np.asarray(values, dtype=np.float64)[order]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)

    def others_at(j: int) -> np.ndarray:  # the j-th smallest of the others, for every i
        nth: np.ndarray = np.where(j < position, ordered[j], ordered[j + 1])
        return nth

    m = n - 1
    middle = m // 2
    medians = others_at(middle) if m % 2 else (others_at(middle - 1) + others_at(middle)) / 2
    return [factor * float(v) if v > 0 else None for v in medians]


def _of_all(values: Sequence[float], factor: float | None) -> float | None:
    return _bound(values, factor, MIN_REPORTS)


def _bound(values: Sequence[float], factor: float | None, needed: int) -> float | None:
    if factor is None or len(values) < needed:
        return None
    median = float(np.median(values))
    return factor * median if median > 0 else None


def _start_deltas(start: Arrays | None, shape: AdapterShape) -> list[np.ndarray]:
    if start is None:
        return [np.zeros(shape.delta_shape(k), dtype=np.float64) for k in shape.layers]
    return effective_deltas(start, shape)


def _update_norms(
    results: Sequence[FitResult], shape: AdapterShape, start: list[np.ndarray]
) -> list[float]:
    """‖ΔW - start‖ of each report over all layers, a chunk of reports' ΔW at a time (holding
    every report's at once cost 110 MB of the actor's heap at 10,000 devices)."""
    reports = [r.arrays for r in results]
    squares = np.zeros(len(reports), dtype=np.float64)
    for k, start_k in zip(shape.layers, start, strict=True):
        for begin, deltas in delta_chunks(reports, shape, k):
            deltas -= start_k
            squares[begin : begin + len(deltas)] += np.einsum("ijk,ijk->i", deltas, deltas)
    return [math.sqrt(v) for v in squares]


def _join(first: str | None, second: str) -> str:
    return second if first is None else f"{first}; {second}"
