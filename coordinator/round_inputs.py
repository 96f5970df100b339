"""A closed round's reports as the federation needs them: measurements and aggregation inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from coordinator.aggregate_task import AggregationOutcome, AggregationRequest
from coordinator.aggregation import FitFailure, aggregation_gap, bound_reports
from coordinator.federation import Measured
from coordinator.fleet import Fleet
from coordinator.reports import ReportMeta, ReportUnreadable
from coordinator.runs import ClusterRun, Run


def measured_before(
    reports: Mapping[str, ReportMeta], devices: Sequence[str]
) -> dict[str, Measured]:
    """Each device's hold-out measurement of the adapter its training started from.

    A report without one (an agent too old to send it) measures nothing; one without the loss
    counts on accuracy alone.
    """
    out = {}
    for d in devices:
        accuracy = reports[d].accuracy_before
        if accuracy is not None:
            out[d] = Measured(accuracy, reports[d].loss_before or 0.0)
    return out


def aggregation_request(
    fleet: Fleet,
    run: Run,
    c: ClusterRun,
    index: int,
    round_id: str,
    answered: Sequence[str],
    failed: Mapping[str, str],
) -> AggregationRequest | str:
    """The cluster's inputs (each answering member's latest valid report, bounded:
    coordinator.aggregation.bounds), or why none. Devices whose update was clipped join the
    cluster's outliers, whose canary evaluations do not count."""
    latest = {meta.device_id: meta for meta in fleet.reports.for_round(round_id)}
    members = set(c.members)  # (a tuple: a look-up a device made the round quadratic)
    failures = [FitFailure(d, why) for d, why in failed.items() if d in members]
    results = []
    for device in answered:
        if device not in members:
            continue
        meta = latest.get(device)
        if meta is None:
            failures.append(FitFailure(device, "succeeded without a valid report"))
            continue
        try:
            results.append(fleet.reports.result(meta))
        except ReportUnreadable as err:  # one damaged row fails its device, not the round
            failures.append(FitFailure(device, str(err)))
    if not results:
        return "no valid report to aggregate"
    first = latest[results[0].device_id]
    parent = c.start_of(index) or None
    start = None if parent is None else fleet.store.get(run.cohort, parent).arrays
    registered = {r.device_id: _registered(fleet, r.device_id) for r in results}
    bounded = bound_reports(results, shape=first.shape, bounds=fleet.config.trust,
                            registered=registered, start=start)  # fmt: skip
    c.outliers = tuple(sorted(set(c.outliers) | bounded.outliers))
    if bounded.notes:
        fleet.records.cluster_outcome(round_id, c.cluster, {"bounded": dict(bounded.notes)})
    return AggregationRequest(
        round_id=round_id,
        cohort=run.cohort,
        base_model_hash=first.base_model_hash,
        shape=first.shape,
        results=bounded.results,
        failures=tuple(failures),
        parent_version=parent,
        cluster=c.cluster,
    )


def _registered(fleet: Fleet, device_id: str) -> int | None:
    record = fleet.registry.get(device_id)
    return None if record is None else record.train_samples


def aggregation_gap_view(outcome: AggregationOutcome) -> dict[str, Any]:
    """How far naive FedAvg lands from the exact aggregate (relative Frobenius, per layer)."""
    exact, naive = outcome.run("exact-delta"), outcome.run("naive-fedavg")
    if exact is None or exact.result is None:
        return {"error": "no exact aggregate to compare with"}
    if naive is None or naive.result is None:
        return {"error": f"naive FedAvg not computed: {naive.error if naive else 'not run'}"}
    gap = aggregation_gap(exact.result.arrays, naive.result.arrays, outcome.request.shape)
    return {"relative_frobenius": list(gap.relative_frobenius)}
