"""One measured round of `skipfleet bench coordinator`: trigger to adapter applied everywhere.

The round's end is taken from the devices themselves: each simulated device logs (with this
machine's wall clock) the moment it starts running a version, so "applied on every device" is
the latest of those moments for the version the round produced. The coordinator's own view
(GET /devices showing that version everywhere, after the apply statuses came back) is recorded
beside it. Messages per second are the coordinator's Prometheus counters over that window.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from skipfleet.coordinator_process import CoordinatorProcess
from skipfleet.loadgen.fleet import SimulatedFleet
from skipfleet.measure import (
    COORDINATOR,
    CpuWindow,
    by_label,
    children_of,
    parse_prometheus,
    role_of,
    total,
)

POLL_S = 0.25
API_POLL_S = 1.0
AGGREGATION = "skipfleet_aggregation_duration_seconds"


class RoundFailed(RuntimeError):
    """The round did not end with its adapter on every device; the message says where."""


@dataclass
class Parties:
    """The processes whose CPU time is accounted: the coordinator's tree, broker, generators."""

    coordinator: CoordinatorProcess
    broker_pid: int
    fleet: SimulatedFleet
    ray_node_pids: tuple[int, ...] = ()  # a local multi-node Ray the coordinator joined
    # A partitioned coordinator's message counters reach /metrics up to a metrics interval
    # late (each partition counts its own ingest): read them after this much
    counters_lag_s: float = 0.0

    def coordinator_tree(self) -> list[int]:
        roots = (self.coordinator.pid, *self.ray_node_pids)
        return [pid for root in roots for pid in children_of(root)]

    def node_window(self) -> CpuWindow | contextlib.nullcontext:
        """With a multi-node Ray: CPU of the driver's tree and of each node's (its partition
        actor, raylet and workers) apart, which one more machine would split."""
        if not self.ray_node_pids:
            return contextlib.nullcontext()
        groups = {f"node_{i}": (lambda pid=pid: children_of(pid))
                  for i, pid in enumerate(self.ray_node_pids)}  # fmt: skip
        return CpuWindow({"driver": lambda: children_of(self.coordinator.pid), **groups})

    def cpu_window(self) -> CpuWindow:
        """The parties' CPU; the coordinator's tree's also by process role (role_of: the driver,
        the fleet actor, Ray's daemons, ...), CpuWindow.seconds_by_label(COORDINATOR)."""
        return CpuWindow(
            {
                COORDINATOR: self.coordinator_tree,
                "mosquitto": lambda: [self.broker_pid],
                "load_generators": lambda: self.fleet.pids,
                "benchmark": lambda: [os.getpid()],  # this process: its polling
            },
            labels={COORDINATOR: functools.partial(role_of, root=self.coordinator.pid)},
        )


def wait_for(what: str, check: Callable[[], object], timeout_s: float, poll_s: float = POLL_S):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RoundFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


@dataclass(frozen=True)
class Ended:
    """A round (one per cohort: a partitioned fleet has several) that ended with its version
    on every device."""

    round_ids: tuple[str, ...]
    records: tuple[dict, ...]  # GET /rounds, once stored
    rollouts: tuple[dict, ...]  # GET /adapters, once decided
    installs: dict[str, float]  # device -> when it started running the version (unix s)

    @property
    def version(self) -> int:
        return self.records[0]["adapter_version"]

    @property
    def last(self) -> tuple[dict, dict]:
        """The phases' ends of the last cohort to reach each: (record, rollout) times."""
        record = {k: max(r[k] for r in self.records) for k in ("closed_at", "finished_at")}
        return record, {"decided_at": max(r["decided_at"] for r in self.rollouts)}


def run_round(parties: Parties, devices: int, timeout_s: float) -> dict:
    api = parties.coordinator.api
    time.sleep(parties.counters_lag_s)
    counters = parse_prometheus(parties.coordinator.metrics())
    triggered = time.time()
    with parties.cpu_window() as cpu, parties.node_window() as nodes:
        ended = _until_applied(api, parties.fleet, devices, triggered, timeout_s)
        cpu_used = cpu.seconds()
        by_node = {k: v for k, v in nodes.seconds().items() if k != "other"} if nodes else {}
        by_role = cpu.seconds_by_label(COORDINATOR)
    applied = max(ended.installs.values())
    window = applied - triggered
    time.sleep(parties.counters_lag_s)
    after = parse_prometheus(parties.coordinator.metrics())
    known = _coordinator_knows(api, ended.version, timeout_s)
    rounds = len(ended.records)
    return {
        "round_id": ",".join(ended.round_ids),
        "cohort_rounds": rounds,
        "adapter_version": ended.version,
        "latency_seconds": window,
        "coordinator_view_seconds": known - triggered,
        "device_latency_seconds": _spread([at - triggered for at in ended.installs.values()]),
        "phases_seconds": _phases(*ended.last, triggered, applied),
        "messages": _messages(counters, after, window),
        "cpu_seconds": cpu_used,
        "cpu_seconds_by_node": by_node,
        "cpu_seconds_by_role": by_role,
        "aggregation_seconds": _aggregation(parties.coordinator, counters, timeout_s, rounds),
        "canary": {
            "devices": sum(len(r["canary_devices"]) for r in ended.rollouts),
            "reason": "; ".join(r["reason"] for r in ended.rollouts),
        },
        "answered": sum(len(r["answered"] or []) for r in ended.records),
        "failures": {d: why for r in ended.records for d, why in r["failures"].items()},
    }


def _until_applied(api, fleet: SimulatedFleet, devices: int, triggered: float, timeout_s: float):
    """POST /finetune {"all": true}, then wait: stored, promoted, running on every device."""
    started = api.post("/finetune", {"all": True})
    opened = started["rounds"]  # one per cohort
    if sum(len(r["devices"]) for r in opened) != devices:
        raise RoundFailed(f"the rounds have not all {devices} devices: {started}")
    records = [_stored(api, r["round_id"], timeout_s, len(opened)) for r in opened]
    versions = {r["adapter_version"] for r in records}
    if len(versions) != 1:  # every cohort's version advances by one a round
        raise RoundFailed(f"the cohorts' rounds made versions {sorted(versions)}")
    (version,) = versions
    rollouts = [_decided(api, record, timeout_s) for record in records]
    for rollout in rollouts:
        if rollout["state"] != "PROMOTED":
            why = f"{rollout['state']} ({rollout['reason']})"
            raise RoundFailed(f"v{version} of {rollout['cohort']} was not promoted: {why}")
    installs = wait_for(
        f"v{version} on all {devices} devices",
        lambda: (
            (seen := fleet.first_installs(version, triggered)) and len(seen) == devices and seen
        ),
        timeout_s,
    )
    ids = tuple(r["round_id"] for r in opened)
    return Ended(ids, tuple(records), tuple(rollouts), installs)


def _stored(api, round_id: str, timeout_s: float, newest: int = 1) -> dict:
    def settled() -> dict | None:
        # A running round's view lists every member's state (~70 ms of the actor's CPU at
        # 10,000 devices, once a second): /health counts the open rounds for ~5 ms.
        if api.get("/health")["open_rounds"]:
            return None
        listed = api.get(f"/rounds?limit={newest}")
        record = next((r for r in listed if r["round_id"] == round_id), None)
        if record is not None and record["stage"] == "FAILED":
            raise RoundFailed(f"round {round_id} failed: {record['error'] or record['failures']}")
        stored = record is not None and record["stage"] == "STORED"
        # The record is stored a moment before its canary is noted in it: wait for both.
        noted = stored and (record["rollout_id"] or record["rollout_note"])
        return record if noted else None

    return wait_for(f"round {round_id} stored", settled, timeout_s, API_POLL_S)


def _decided(api, record: dict, timeout_s: float) -> dict:
    if record["rollout_id"] is None:
        raise RoundFailed(f"no canary started: {record['rollout_note']}")

    def decided() -> dict | None:
        for cohort in api.get("/adapters"):
            for rollout in cohort["rollouts"]:
                if rollout["rollout_id"] == record["rollout_id"] and rollout["state"] != "CANARY":
                    return rollout
        return None

    return wait_for("the canary's verdict", decided, timeout_s, API_POLL_S)


def _coordinator_knows(api, version: int, timeout_s: float) -> float:
    wait_for(
        f"GET /devices showing v{version} everywhere",
        lambda: all(d["adapter_version"] == version for d in api.get("/devices")),
        timeout_s,
        API_POLL_S,
    )
    return time.time()


def _phases(record: dict, rollout: dict, triggered: float, applied: float) -> dict:
    """Trigger → all reports in (round closed) → aggregated and stored → canary decided →
    applied on every device; the coordinator's timestamps (same clock as ours)."""
    return {
        "finetune": record["closed_at"] - triggered,
        "aggregate_and_store": record["finished_at"] - record["closed_at"],
        "canary": rollout["decided_at"] - record["finished_at"],
        "distribute": applied - rollout["decided_at"],
    }


def _messages(before, after, window: float) -> dict:
    out = {}
    for direction in ("received", "sent"):
        name = f"skipfleet_{direction}_messages_total"
        kinds_before, kinds_after = by_label(before, name, "kind"), by_label(after, name, "kind")
        kinds = {k: v - kinds_before.get(k, 0.0) for k, v in kinds_after.items()}
        count = sum(kinds.values())
        out[direction] = {"count": count, "per_second": count / window, "by_kind": kinds}
    rejected = total(after, "skipfleet_rejected_messages_total")
    out["rejected"] = rejected - total(before, "skipfleet_rejected_messages_total")
    reasons_before = by_label(before, "skipfleet_rejected_messages_total", "reason")
    reasons = by_label(after, "skipfleet_rejected_messages_total", "reason").items()
    out["rejected_by_reason"] = {r: n - reasons_before.get(r, 0.0) for r, n in reasons
                                 if n > reasons_before.get(r, 0.0)}  # fmt: skip
    return out


def _aggregation(coordinator: CoordinatorProcess, before, timeout_s: float, rounds: int) -> dict:
    """Each strategy's task time in this round (summed over its cohorts' rounds), from the
    histogram (updated every 2 s)."""

    def observed():
        now = parse_prometheus(coordinator.metrics())
        counts = by_label(now, AGGREGATION + "_count", "algorithm")
        done = {a: counts[a] - by_label(before, AGGREGATION + "_count", "algorithm").get(a, 0)
                for a in counts}  # fmt: skip
        return now if done and all(n >= rounds for n in done.values()) else None

    now = wait_for("the aggregation histogram", observed, timeout_s, API_POLL_S)
    sums_before = by_label(before, AGGREGATION + "_sum", "algorithm")
    return {a: s - sums_before.get(a, 0.0) for a, s in by_label(now, AGGREGATION + "_sum",
                                                                  "algorithm").items()}  # fmt: skip


def _spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "max": ordered[-1],
    }
