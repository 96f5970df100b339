"""One measured round of `skipfleet bench coordinator`: trigger to adapter applied everywhere.

The round's end is taken from the devices themselves: each simulated device logs (with this
machine's wall clock) the moment it starts running a version, so "applied on every device" is
the latest of those moments for the version the round produced. The coordinator's own view
(GET /devices showing that version everywhere, after the apply statuses came back) is recorded
beside it. Messages per second are the coordinator's Prometheus counters over that window.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from skipfleet.coordinator_process import CoordinatorProcess
from skipfleet.loadgen.fleet import SimulatedFleet
from skipfleet.measure import CpuWindow, by_label, children_of, parse_prometheus, total

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

    def cpu_window(self) -> CpuWindow:
        return CpuWindow(
            {
                "coordinator_and_ray": lambda: children_of(self.coordinator.pid),
                "mosquitto": lambda: [self.broker_pid],
                "load_generators": lambda: self.fleet.pids,
                "benchmark": lambda: [os.getpid()],  # this process: its polling
            }
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
    """A round that ended with its version on every device."""

    round_id: str
    record: dict  # GET /rounds, once stored
    rollout: dict  # GET /adapters, once decided
    installs: dict[str, float]  # device -> when it started running the version (unix s)


def run_round(parties: Parties, devices: int, timeout_s: float) -> dict:
    api = parties.coordinator.api
    counters = parse_prometheus(parties.coordinator.metrics())
    triggered = time.time()
    with parties.cpu_window() as cpu:
        ended = _until_applied(api, parties.fleet, devices, triggered, timeout_s)
        cpu_used = cpu.seconds()
    applied = max(ended.installs.values())
    window = applied - triggered
    after = parse_prometheus(parties.coordinator.metrics())
    version = ended.record["adapter_version"]
    known = _coordinator_knows(api, version, timeout_s)
    return {
        "round_id": ended.round_id,
        "adapter_version": version,
        "latency_seconds": window,
        "coordinator_view_seconds": known - triggered,
        "device_latency_seconds": _spread([at - triggered for at in ended.installs.values()]),
        "phases_seconds": _phases(ended.record, ended.rollout, triggered, applied),
        "messages": _messages(counters, after, window),
        "cpu_seconds": cpu_used,
        "aggregation_seconds": _aggregation(parties.coordinator, counters, timeout_s),
        "canary": {
            "devices": len(ended.rollout["canary_devices"]),
            "reason": ended.rollout["reason"],
        },
        "answered": len(ended.record["answered"] or []),
        "failures": ended.record["failures"],
    }


def _until_applied(api, fleet: SimulatedFleet, devices: int, triggered: float, timeout_s: float):
    """POST /finetune {"all": true}, then wait: stored, promoted, running on every device."""
    started = api.post("/finetune", {"all": True})
    (opened,) = started["rounds"]
    if len(opened["devices"]) != devices:
        raise RoundFailed(f"the round has {len(opened['devices'])} of {devices} devices: {started}")
    record = _stored(api, opened["round_id"], timeout_s)
    version = record["adapter_version"]
    rollout = _decided(api, record, timeout_s)
    if rollout["state"] != "PROMOTED":
        raise RoundFailed(f"v{version} was not promoted: {rollout['state']} ({rollout['reason']})")
    installs = wait_for(
        f"v{version} on all {devices} devices",
        lambda: (
            (seen := fleet.first_installs(version, triggered)) and len(seen) == devices and seen
        ),
        timeout_s,
    )
    return Ended(opened["round_id"], record, rollout, installs)


def _stored(api, round_id: str, timeout_s: float) -> dict:
    def settled() -> dict | None:
        record = next((r for r in api.get("/rounds?limit=1") if r["round_id"] == round_id), None)
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
    return out


def _aggregation(coordinator: CoordinatorProcess, before, timeout_s: float) -> dict:
    """Each strategy's task time in this round, from the histogram (updated every 2 s)."""

    def observed():
        now = parse_prometheus(coordinator.metrics())
        counts = by_label(now, AGGREGATION + "_count", "algorithm")
        done = {a: counts[a] - by_label(before, AGGREGATION + "_count", "algorithm").get(a, 0)
                for a in counts}  # fmt: skip
        return now if done and all(n >= 1 for n in done.values()) else None

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
