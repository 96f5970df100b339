"""What a simulation shows while it runs (progress) and what it leaves (the result dict)."""

from __future__ import annotations

import sys
import time
from collections import Counter

from shared.protocol.messages import Heartbeat, Report

ACTIVE_JOB_STATES = ("QUEUED", "IN_PROGRESS")
HEARTBEAT_LINE_S = 10.0  # repeat an unchanged progress line this often, so silence means stuck


class Progress:
    """One line whenever the fleet's state changes: devices, jobs, the latest round, adapters."""

    def __init__(self, t0: float):
        self.t0 = t0
        self._last_line, self._last_at = "", 0.0

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {message}", file=sys.stderr, flush=True)

    def show(self, api) -> None:
        line = self._line(api)
        if line != self._last_line or time.monotonic() - self._last_at > HEARTBEAT_LINE_S:
            self.say(line)
            self._last_line, self._last_at = line, time.monotonic()

    def _line(self, api) -> str:
        devices = api.get("/devices")
        jobs = Counter(j["state"] for j in api.get("/jobs?limit=500"))
        rounds = api.get("/rounds?limit=1")
        active = ", ".join(f"{jobs[s]} {s.lower()}" for s in ACTIVE_JOB_STATES if jobs[s]) or "none"
        parts = [
            f"devices online {sum(d['online'] for d in devices)}/{len(devices)}",
            f"jobs active: {active}, {jobs['SUCCEEDED']} succeeded",
        ]
        if rounds:
            r = rounds[0]
            answered = len(r.get("answered") or [])
            parts.append(f"round {r['round_id']}: {r['stage'].lower()} ({answered} answered)")
        versions = sorted({d["adapter_version"] for d in devices if d["adapter_version"]})
        parts.append(f"adapter versions running: {versions or 'none'}")
        return " | ".join(parts)


def collect(sim, scenario, broker_kind: str, round_ids: list[str], evaluations: dict) -> dict:
    reports = _by_device(sim.probe.messages(Report))
    per_device = [
        _device_row(sim, d, reports.get(d.device_id, []), evaluations) for d in scenario.devices
    ]
    result = {
        "dataset": scenario.dataset,
        "devices": len(scenario.devices),
        "rounds_requested": sim.args.rounds,
        "drift_at": sim.args.drift_at,
        "broker": broker_kind,
        "description": scenario.description,
        "base_model_hash": scenario.base_model_hash,
        "duration_seconds": sim.elapsed(),
        "per_device": per_device,
        "rounds": [
            _round_row(sim, r) for r in sim.api.get("/rounds") if r["round_id"] in round_ids
        ],
        "drift_series": _drift_series(sim),
        "timeline": _timeline(sim),
        "metrics_url": sim.metrics_url,
    }
    result["rounds"].reverse()  # oldest first
    return result


def _by_device(messages) -> dict[str, list]:
    out: dict[str, list] = {}
    for device, envelope, _ in messages:
        out.setdefault(device, []).append(envelope.message)
    return out


def _device_row(sim, device, reports: list, evaluations: dict) -> dict:
    first = reports[0].metrics if reports else None
    start = evaluations["start"].get(device.device_id)
    return {
        "device": device.device_id,
        "description": device.description,
        # before any fine-tune: with a drift event, the drifted data just before the first
        # fine-tune (the report's own "before"); otherwise the evaluation at the start
        "accuracy_initial": first.accuracy_before if sim.drift and first else start,
        "accuracy_at_start": start,
        "accuracy_own": first.accuracy_after if first else None,
        "accuracy_fleet": evaluations.get("fleet", {}).get(device.device_id),
        "fleet_version": evaluations.get("fleet_version"),
        "accuracy_end": evaluations["end"].get(device.device_id),
        "finetunes": len(reports),
        "finetune_seconds": sum(r.metrics.finetune_seconds for r in reports) if reports else None,
        "joules": sum(r.metrics.joules for r in reports) if reports else None,
        "power_source": first.power_source if first else None,
        "bytes_sent": sim.probe.bytes_from_device.get(device.device_id, 0),
    }


def _round_row(sim, record: dict) -> dict:
    started, finished = record.get("started_at"), record.get("finished_at")
    return {
        "round": record["round_id"],
        "trigger": record["trigger"],
        "stage": record["stage"],
        "completed": record["stage"] == "STORED",
        "answered": len(record.get("answered") or []),
        "failed": sorted((record.get("failures") or {}).keys()),
        "adapter_version": record.get("adapter_version"),
        "outcome": sim._rollout_state(record) or record["stage"].lower(),
        "exact_vs_naive_gap": record.get("gap"),
        "seconds": finished - started if started and finished else None,
    }


def _drift_series(sim) -> dict[str, list]:
    series: dict[str, list] = {}
    for device, envelope, arrival in sim.probe.messages(Heartbeat):
        score = envelope.message.drift_score
        if score is not None and arrival >= sim.t0:
            series.setdefault(device, []).append((round(arrival - sim.t0, 2), score))
    return series


def _timeline(sim) -> list[dict]:
    events = []
    if sim.args.drift_at is not None:
        events.append({"t": sim.args.drift_at, "event": "drift"})
    return events


def _pct(value) -> str:
    return "     -" if value is None else f"{value * 100:5.1f}%"


def format_table(result: dict) -> str:
    head = (
        f"{'device':28s} {'before':>7s} {'own FT':>7s} {'fleet':>7s} {'at end':>7s} "
        f"{'tune s':>7s} {'joules':>7s} {'bytes':>8s}"
    )
    lines = [head, "-" * len(head)]
    for d in result["per_device"]:
        tune = "-" if d["finetune_seconds"] is None else f"{d['finetune_seconds']:.3f}"
        joules = "-" if d["joules"] is None else f"{d['joules']:.3f}"
        lines.append(
            f"{d['device']:28s} {_pct(d['accuracy_initial']):>7s} {_pct(d['accuracy_own']):>7s} "
            f"{_pct(d['accuracy_fleet']):>7s} {_pct(d['accuracy_end']):>7s} {tune:>7s} "
            f"{joules:>7s} {d['bytes_sent']:8d}"
        )
    for r in result["rounds"]:
        failed = f", failed: {', '.join(r['failed'])}" if r["failed"] else ""
        lines.append(
            f"round {r['round']} ({r['trigger']}): {r['answered']} answered, adapter "
            f"v{r['adapter_version']} {r['outcome']}{failed}"
        )
    lines.append(
        "before: hold-out accuracy before any fine-tune; own FT: after the device's own "
        "fine-tune; fleet: with the last fleet adapter; at end: what it runs at the end"
    )
    lines.append(
        f"{result['devices']} devices, {result['dataset']}, broker: {result['broker']}, "
        f"{result['duration_seconds']:.0f} s"
    )
    return "\n".join(lines)
