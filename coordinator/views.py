"""Read-only views of the fleet state: JSON-ready dicts for the HTTP API, and the metrics
snapshot. Plain values only (they cross the Ray boundary)."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import numpy as np

from coordinator.adapter_store import WHOLE_COHORT
from coordinator.clusters import Placement
from coordinator.fleet import Fleet, NotFound
from coordinator.jobs import Job
from coordinator.observations import DeviceGauges, FleetSnapshot
from coordinator.registry import DeviceRecord
from coordinator.round_records import RoundRecord, RoundStage
from coordinator.runs import Run


def device_view(
    record: DeviceRecord, now: float, placement: Placement | None = None
) -> dict[str, Any]:
    # field by field, not dataclasses.asdict (a deep copy of every value: a fleet-wide view)
    view = {name: getattr(record, name) for name in _RECORD_FIELDS}
    seen = _last_seen(record)
    view["last_seen"] = seen
    view["seen_seconds_ago"] = None if seen is None else max(0.0, now - seen)
    view["labelled"] = record.labelled
    view["cluster"] = None if placement is None else placement.cluster
    view["placed"] = None if placement is None else placement.how
    view["running"] = {
        "version": record.adapter_version,
        "origin": record.adapter_origin,
        "why": record.adapter_reason,
    }
    return view


# bytes: the clusters view shows where it placed the device
_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceRecord) if f.name != "signature")


def _origin(r: DeviceRecord) -> str:
    return r.adapter_origin or ("fleet" if r.adapter_version is not None else "base")


def _last_seen(r: DeviceRecord) -> float | None:
    return max((t for t in (r.last_heartbeat_at, r.presence_since) if t is not None), default=None)


def _gauges(r: DeviceRecord, placement: Placement | None) -> DeviceGauges:
    origin = _origin(r)
    return DeviceGauges(
        device_id=r.device_id,
        online=r.online,
        accuracy_before=r.accuracy_before,
        accuracy_after=r.accuracy_after,
        power_w=r.power_w,
        temperature_c=r.temperature_c,
        drift_score=r.drift_score,
        adapter_version=r.adapter_version,
        adapter_origin=origin,
        cluster=(placement.cluster if placement is not None else None) or "none",
        confidence_score=r.confidence_score,
        feature_score=r.feature_score,
        accuracy=r.accuracy,
        last_seen=_last_seen(r),
        spooled=r.spool_depth,
        cohort=r.cohort or "none",
        clock_offset_s=r.clock_offset_s,
    )


def _behind(current: dict[str, int], r: DeviceRecord, placement: Placement | None) -> bool:
    """Whether the device runs something other than its cluster's current fleet version (the
    cohort's, or the newest, for a device in no cluster with one); False where none exists.
    `current`: its cohort's current versions (fleet.store.current_versions)."""
    if not current:
        return False
    cluster = placement.cluster if placement is not None else None
    own = current.get(cluster) if cluster is not None else None
    target = own or current.get(WHOLE_COHORT) or max(current.values())
    return not (_origin(r) == "fleet" and r.adapter_version == target)


def _placement(fleet: Fleet, record: DeviceRecord) -> Placement | None:
    return (
        None if record.cohort is None else fleet.clusters.placement(record.cohort, record.device_id)
    )


def job_view(job: Job) -> dict[str, Any]:
    return dataclasses.asdict(job)


def _placed(
    fleet: Fleet, records: list[DeviceRecord]
) -> list[tuple[DeviceRecord, Placement | None]]:
    """Each record with its placement."""
    placements = fleet.clusters.placements()
    return [
        (r, None if r.cohort is None else placements.get((r.cohort, r.device_id))) for r in records
    ]


def devices(fleet: Fleet) -> list[dict[str, Any]]:
    now = fleet.clock()
    return [device_view(r, now, p) for r, p in _placed(fleet, fleet.registry.devices())]


# What the dashboard's history records of a device (coordinator.dashboard): its readings and
# their times, and its presence.
READING_FIELDS = (
    "device_id",
    "last_heartbeat_at",
    "confidence_score",
    "power_w",
    "spool_depth",
    "accuracy_at",
    "accuracy",
    "last_finetune_at",
    "accuracy_after",
    "online",
    "presence_since",
)


def device_readings(
    fleet: Fleet, store: str, since: dict[str, int] | None = None
) -> dict[str, Any]:
    """The readings of the devices whose records changed since the version `since` holds for
    this fleet state's `store` (absent: every device). The answer's `since` is what to ask with
    next; a partitioned coordinator merges the partitions' (coordinator.partition_views). A
    sampler that read the whole devices view every 2 s cost 0.3 s of the actor's CPU at 10,000
    devices, and as much again in the driver, whatever had changed."""
    records, version = fleet.registry.changed_since((since or {}).get(store, 0))
    devices = [{name: getattr(r, name) for name in READING_FIELDS} for r in records]
    return {"since": {store: version}, "devices": devices}


def device(fleet: Fleet, device_id: str) -> dict[str, Any]:
    record = fleet.registry.get(device_id)
    if record is None:
        raise NotFound(f"unknown device {device_id!r}")
    view = device_view(record, fleet.clock(), _placement(fleet, record))
    view["jobs"] = [job_view(j) for j in fleet.jobs.recent(20, device_id=device_id)]
    return view


def device_adapters(fleet: Fleet, device_id: str) -> list[dict[str, Any]]:
    """A device's personalised adapters (its fine-tune reports), newest first."""
    if fleet.registry.get(device_id) is None:
        raise NotFound(f"unknown device {device_id!r}")
    return [
        {
            "job_id": m.job_id,
            "round_id": m.round_id,
            "cohort": m.cohort,
            "samples": m.samples,
            "parent_adapter_version": m.parent_adapter_version,
            "received_at": m.received_at,
            # the file an earlier version stored its arrays in, until its round's arrays are
            # dropped; None: in the state db while the round runs, dropped once it ended
            "file": m.file or None,
        }
        for m in fleet.reports.for_device(device_id)
    ]


def jobs(fleet: Fleet, limit: int = 100, device_id: str | None = None) -> list[dict[str, Any]]:
    return [job_view(j) for j in fleet.jobs.recent(limit, device_id=device_id)]


def rounds(fleet: Fleet, limit: int = 50) -> list[dict[str, Any]]:
    return [round_view(fleet, r) for r in fleet.records.recent(limit)]


def round_view(fleet: Fleet, record: RoundRecord) -> dict[str, Any]:
    view = record.as_dict()
    definition = fleet.rounds.get(record.round_id)
    if definition is not None:
        view["devices"] = list(definition.device_ids)
        view["deadline"] = definition.deadline
        view["min_completion_ratio"] = definition.min_completion_ratio
    if record.stage is RoundStage.RUNNING:
        status = fleet.scheduler.round_status(record.round_id)
        view["answered"] = list(status.answered)
        view["pending"] = list(status.pending)
        view["failures"] = dict(status.failed)
        view["completion_ratio"] = status.completion_ratio
    return view


def adapters(fleet: Fleet) -> list[dict[str, Any]]:
    out = []
    for cohort in fleet.store.cohorts():
        current = fleet.store.current_versions(cohort)
        out.append(
            {
                "cohort": cohort,
                # one cluster's version, or the newest of several (each is in current_versions)
                "current_version": max(current.values()) if current else None,
                "current_versions": current,
                "versions": [dataclasses.asdict(m) for m in fleet.store.versions(cohort)],
                "rollouts": [dataclasses.asdict(r) for r in fleet.rollouts.history(cohort)],
            }
        )
    return out


def adapter(fleet: Fleet, cohort: str, version: int) -> dict[str, Any]:
    """One stored version with its arrays (base64 little-endian bytes, dtype and shape)."""
    meta = fleet.store.meta(cohort, version)
    if meta is None:
        raise NotFound(f"cohort {cohort} has no adapter version {version}")
    stored = fleet.store.get(cohort, version)
    arrays = {
        name: {
            "dtype": np.asarray(a).dtype.newbyteorder("<").str,
            "shape": list(np.shape(a)),
            "data": base64.b64encode(
                np.ascontiguousarray(a).astype(np.asarray(a).dtype.newbyteorder("<")).tobytes()
            ).decode(),
        }
        for name, a in stored.arrays.items()
    }
    return {"meta": dataclasses.asdict(meta), "arrays": arrays}


def clusters(fleet: Fleet) -> list[dict[str, Any]]:
    """Per cohort: its clusters, their members and current versions, and the unplaced."""
    out = []
    for cohort in fleet.registry.cohorts():
        current = fleet.store.current_versions(cohort)
        members = fleet.clusters.clusters(cohort)
        out.append(
            {
                "cohort": cohort,
                "clusters": [
                    {"cluster": c, "members": list(m), "current_version": current.get(c)}
                    for c, m in members.items()
                ],
            }
        )
    return out


def runs(fleet: Fleet, limit: int = 20) -> list[dict[str, Any]]:
    return [run_view(r) for r in fleet.runs.recent(limit)]


def run_view(run: Run) -> dict[str, Any]:
    clusters = {}
    for name, c in run.clusters.items():
        measured = {
            str(index): {
                "accuracy": sum(m.accuracy for m in by.values()) / len(by),
                "loss": sum(m.loss for m in by.values()) / len(by),
                "devices": len(by),
            }
            for index, by in sorted(c.progress.measured.items())
            if by
        }
        clusters[name] = {
            "stage": c.stage.value,
            "members": list(c.members),
            "start_version": c.start_version,
            "rounds": c.progress.rounds_done,
            "aggregates": {str(index): v for index, v in c.aggregates.items()},
            "measured": measured,  # aggregate index (0: the start) -> mean over members
            "candidate": c.candidate,
            "rollout_id": c.rollout_id,
            "note": c.note,
        }
    return {
        "run_id": run.run_id,
        "cohort": run.cohort,
        "trigger": run.trigger,
        "state": run.state.value,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "rounds": list(run.rounds),
        "clusters": clusters,
    }


class GaugesMemo:
    """Each device's gauges as last derived, reused while its record and its placement are the
    very same objects (the registry and ClusterBook.placements keep an unchanged one): the
    metrics snapshot, every 2 s, derives only what changed. One caller thread at a time."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[DeviceRecord, Placement | None, DeviceGauges]] = {}

    def gauges(
        self, records: list[tuple[DeviceRecord, Placement | None]]
    ) -> tuple[DeviceGauges, ...]:
        last, now = self._last, {}
        for record, placement in records:
            seen = last.get(record.device_id)
            if seen is None or seen[0] is not record or seen[1] is not placement:
                seen = (record, placement, _gauges(record, placement))
            now[record.device_id] = seen
        self._last = now
        return tuple(seen[2] for seen in now.values())


def snapshot(fleet: Fleet, memo: GaugesMemo | None = None) -> FleetSnapshot:
    records = _placed(fleet, fleet.registry.devices())
    gauges = (memo or GaugesMemo()).gauges(records)
    members: dict[str, int] = {}
    behind: dict[str, int] = {}
    currents: dict[str, dict[str, int]] = {}  # per cohort, read once
    for r, placement in records:
        if r.cohort is None:
            continue
        if r.cohort not in currents:
            currents[r.cohort] = fleet.store.current_versions(r.cohort)
        members[r.cohort] = members.get(r.cohort, 0) + 1
        behind[r.cohort] = behind.get(r.cohort, 0) + _behind(currents[r.cohort], r, placement)
    versions = {}
    for cohort in fleet.store.cohorts():
        current = fleet.store.current_versions(cohort)
        if current:
            versions[cohort] = max(current.values())
    states = {state.value: n for state, n in fleet.jobs.count_by_state().items()}
    now = fleet.clock()
    quarantined = sum(1 for r, _ in records if r.quarantined_until and r.quarantined_until > now)
    return FleetSnapshot(gauges, states, versions, quarantined, members, behind)
