"""What the API and /metrics show of a partitioned fleet: each partition's view, merged.

Partitions own disjoint cohorts, so their devices, rounds, runs, adapters and clusters are
disjoint: a merge concatenates, sorts as one actor would, and cuts to the asked limit. Plain
functions over the JSON-ready views (coordinator.views) and the metrics reports; no Ray.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.observations import FleetSnapshot, MetricEvent, MetricsReport

View = list[dict[str, Any]]


def _newest(key: str, limit: int) -> Callable[[Sequence[View]], View]:
    def merge(views: Sequence[View]) -> View:
        rows = [row for view in views for row in view]
        rows.sort(key=lambda row: row[key], reverse=True)
        return rows[:limit]

    return merge


def _sorted_by(key: str) -> Callable[[Sequence[View]], View]:
    def merge(views: Sequence[View]) -> View:
        return sorted((row for view in views for row in view), key=lambda row: str(row[key]))

    return merge


def merge_view(view: str, args: Sequence[Any], views: Sequence[Any]) -> Any:
    """One list view from every partition's (devices, jobs, rounds, runs, adapters, clusters)."""
    limit = args[0] if args else None
    merges: dict[str, Callable[[Sequence[View]], View]] = {
        "devices": _sorted_by("device_id"),
        "jobs": _newest("created_at", 100 if limit is None else limit),
        "rounds": _newest("started_at", 50 if limit is None else limit),
        "runs": _newest("started_at", 20 if limit is None else limit),
        "adapters": _sorted_by("cohort"),
        "clusters": _sorted_by("cohort"),
    }
    if view == "device_readings":
        return merge_readings(views)
    if view not in merges:
        raise ValueError(f"view {view!r} is not merged across partitions")
    return merges[view](views)


def merge_readings(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """device_readings from every partition: each one's version under its own name."""
    return {
        "since": {store: v for a in answers for store, v in a["since"].items()},
        "devices": [d for a in answers for d in a["devices"]],
    }


MERGED_VIEWS = frozenset(
    {"devices", "device_readings", "jobs", "rounds", "runs", "adapters", "clusters"}
)
# Views of one device, answered by the partition that has it.
DEVICE_VIEWS = frozenset({"device", "device_adapters"})

_SUMMED = ("devices", "online", "active_jobs", "open_rounds", "aggregating_rounds",
           "active_runs", "dropped_metric_events", "outbox_backlog")  # fmt: skip


_PER_PARTITION = ("partition", "pid", "node_id", "resources", "mqtt_connected", "devices",
                  "received")  # fmt: skip


def merge_health(healths: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The fleet's health: counts summed, every partition's stuck work, and each partition's
    own answer (its pid, node, broker connection) under `partitions`."""
    merged: dict[str, Any] = {
        "status": "ok",
        "started_at": min(h["started_at"] for h in healths),
        **{name: sum(h[name] for h in healths) for name in _SUMMED},
        "stuck": [s for h in healths for s in h["stuck"]],
        "partitions": [{k: h[k] for k in _PER_PARTITION} for h in healths],
    }
    return merged


def merge_snapshots(snapshots: Sequence[FleetSnapshot]) -> FleetSnapshot:
    jobs: Counter[str] = Counter()
    versions: dict[str, int] = {}
    members: dict[str, int] = {}
    behind: dict[str, int] = {}
    for s in snapshots:
        jobs.update(s.jobs_by_state)
        versions.update(s.adapter_versions)
        members.update(s.cohort_devices)
        behind.update(s.devices_behind)
    return FleetSnapshot(
        devices=tuple(d for s in snapshots for d in s.devices),
        jobs_by_state=dict(jobs),
        adapter_versions=versions,
        devices_quarantined=sum(s.devices_quarantined for s in snapshots),
        cohort_devices=members,
        devices_behind=behind,
    )


@dataclass(frozen=True)
class PartitionReport:
    """What a partition hands the driver's /metrics: the fleet state's report, and what its
    own MQTT ingest counted (per kind: messages and bytes received, messages sent)."""

    report: MetricsReport
    received: dict[str, tuple[int, int]] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)


def merge_reports(reports: Sequence[PartitionReport]) -> PartitionReport:
    events: list[MetricEvent] = [e for r in reports for e in r.report.events]
    received: dict[str, tuple[int, int]] = {}
    sent: Counter[str] = Counter()
    for r in reports:
        for kind, (count, size) in r.received.items():
            before = received.get(kind, (0, 0))
            received[kind] = (before[0] + count, before[1] + size)
        sent.update(r.sent)
    # a partition's report always has one (RelayMetrics keeps its last)
    snapshot = merge_snapshots(
        [r.report.snapshot for r in reports if r.report.snapshot is not None]
    )
    return PartitionReport(MetricsReport(tuple(events), snapshot), received, dict(sent))


def merge_started(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """POST /finetune's answer from several partitions: their rounds and their skips."""
    return {
        "rounds": [r for a in answers for r in a["rounds"]],
        "skipped": {k: v for a in answers for k, v in a["skipped"].items()},
    }


def merge_evaluating(answers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """POST /evaluate's answer from several partitions."""
    return {
        "evaluating": [e for a in answers for e in a["evaluating"]],
        "skipped": {k: v for a in answers for k, v in a["skipped"].items()},
    }
