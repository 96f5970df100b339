"""What a simulation shows while it runs (progress) and what it leaves (the result dict)."""

from __future__ import annotations

import base64
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

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


def collect(sim, scenario, broker_kind: str, runs: list[dict], evaluations: dict) -> dict:
    # with a drift event, the reports of the run that answered it (earlier runs: before it)
    since = evaluations.get("answered_from")
    since = None if since is None else since - sim.wall_t0 + sim.t0  # on the probe's clock
    reports = _by_device(sim.probe.messages(Report), since)
    devices = {d["device_id"]: d for d in sim.api.get("/devices")}
    truth = TruthMeter(sim.api, scenario.base_model)
    per_device = [
        _device_row(sim, d, reports.get(d.device_id, []), evaluations, devices, truth)
        for d in (*scenario.devices, *scenario.new_devices)
    ]
    result = {
        "dataset": scenario.dataset,
        "devices": len(scenario.devices),
        "new_devices": len(scenario.new_devices),
        "runs_requested": sim.args.runs,
        "drift_at": sim.args.drift_at,
        "broker": broker_kind,
        "description": scenario.description,
        "base_model_hash": scenario.base_model_hash,
        "duration_seconds": sim.elapsed(),
        "per_device": per_device,
        "runs": [_run_row(run) for run in runs],
        "drift_series": _drift_series(sim),
        **_rollouts_and_timeline(sim, runs),
        "metrics_url": sim.metrics_url,
    }
    return result


def _by_device(messages, since: float | None = None) -> dict[str, list]:
    out: dict[str, list] = {}
    for device, envelope, arrival in messages:
        if since is None or arrival >= since:
            out.setdefault(device, []).append(envelope.message)
    return out


class TruthMeter:
    """Accuracy of what a device without labels runs, on the labels only the simulation holds
    (the device cannot measure it; the coordinator's API gives the adapter's arrays)."""

    def __init__(self, api, base_model: Path):
        from agent.trainer.base_models import load_base_model

        self._api = api
        self._model = load_base_model(base_model)  # an MLP or a CNN, by the kind in its file

    def accuracy(self, truth_file: Path, device: dict, version: int | None) -> float:
        with np.load(truth_file, allow_pickle=False) as truth:
            X, y = truth["X"], truth["y"]
        return self._model.accuracy(X, y, self._adapter(device, version))

    def _adapter(self, device: dict, version: int | None):
        from agent.trainer.adapter import Adapter

        if version is None:
            return None
        stored = self._api.get(f"/adapters/{device['cohort']}/{version}")
        arrays = {name: _array(a) for name, a in stored["arrays"].items()}
        model = self._model
        return Adapter.from_arrays(arrays, model.layer_input_dims, model.n_classes)


def _array(wire: dict) -> np.ndarray:
    data = base64.b64decode(wire["data"])
    return np.frombuffer(data, dtype=np.dtype(wire["dtype"])).reshape(wire["shape"])


def _device_row(sim, device, reports: list, evaluations: dict, seen: dict, truth) -> dict:
    first = reports[0].metrics if reports else None
    record = seen.get(device.device_id, {})
    running = record.get("running") or {}
    row = {
        "device": device.device_id,
        "description": device.description,
        "labelled": device.labelled,
        "cluster": record.get("cluster"),
        "runs": _what_it_runs(running),
        "why": running.get("why") or _why_base(record),
        "finetunes": len(reports),
        "finetune_seconds": sum(r.metrics.finetune_seconds for r in reports) if reports else None,
        "joules": sum(r.metrics.joules for r in reports) if reports else None,
        "power_source": first.power_source if first else None,
        "bytes_sent": sim.probe.bytes_from_device.get(device.device_id, 0),
    }
    if not device.labelled:  # measured on the truth only the simulation holds
        before = truth.accuracy(device.truth_file, record, None)
        end = truth.accuracy(device.truth_file, record, running.get("version"))
        return {**row, "accuracy_initial": before, "accuracy_at_start": None,
                "accuracy_own": None, "accuracy_end": end}  # fmt: skip
    start = evaluations["start"].get(device.device_id)
    return {
        **row,
        # before any fine-tune: with a drift event, the drifted data just before the first
        # fine-tune (the report's own "before"); otherwise the evaluation at the start
        "accuracy_initial": first.accuracy_before if sim.drift and first else start,
        "accuracy_at_start": start,
        # its own fine-tune: the first round started from the base model
        "accuracy_own": first.accuracy_after if first else None,
        "accuracy_end": evaluations["end"].get(device.device_id),
    }


def _what_it_runs(running: dict) -> str:
    if running.get("version") is not None:
        return f"v{running['version']}"
    return running.get("origin") or "base"


def _why_base(record: dict) -> str:
    if not record:
        return "never seen by the coordinator"
    return record.get("placed") or "runs the base model"


def _run_row(run: dict) -> dict:
    started, finished = run.get("started_at"), run.get("finished_at")
    return {
        "run": run["run_id"],
        "trigger": run["trigger"],
        "rounds": len(run["rounds"]),
        "seconds": finished - started if started and finished else None,
        "clusters": {
            name: {
                "members": c["members"],
                "rounds": c["rounds"],
                "measured": c["measured"],
                "candidate": c["candidate"],
                "note": c["note"],
            }
            for name, c in run["clusters"].items()
        },
    }


def _drift_series(sim) -> dict[str, list]:
    series: dict[str, list] = {}
    for device, envelope, arrival in sim.probe.messages(Heartbeat):
        score = envelope.message.confidence_score  # what the coordinator triggers on
        if score is not None and arrival >= sim.t0:
            series.setdefault(device, []).append((round(arrival - sim.t0, 2), score))
    return series


def _rollouts_and_timeline(sim, runs: list[dict]) -> dict:
    """The canaries (each device's candidate and current accuracy, the decision) and what
    happened when, in seconds since the agents started: the coordinator's dashboard's timeline
    (runs, every round, canaries, decisions, faults injected with `skipfleet fleet`)."""
    from coordinator.dashboard import read_fleet_events, rollouts, timeline
    from skipfleet.fleet.runstate import EVENTS_FILE

    canaries = rollouts(sim.api.get("/adapters"))
    rounds = sim.api.get("/rounds?limit=1000")
    faults = read_fleet_events(sim.run_dir / "fleet" / EVENTS_FILE)
    events = [{**e, "t": round(e["t"] - sim.wall_t0, 2)}
              for e in timeline(runs, rounds, canaries, faults)]  # fmt: skip
    if sim.args.drift_at is not None:
        events.append({"t": sim.args.drift_at, "kind": "drift", "text": "the devices' data drifts"})
    events.sort(key=lambda e: e["t"])
    for r in canaries:  # on the same clock as the timeline
        for key in ("started_at", "decided_at"):
            r[key] = None if r[key] is None else round(r[key] - sim.wall_t0, 2)
    return {"rollouts": canaries, "timeline": events}


def _pct(value) -> str:
    return "     -" if value is None else f"{value * 100:5.1f}%"


def format_table(result: dict) -> str:
    head = (
        f"{'device':30s} {'labels':>6s} {'cluster':>7s} {'before':>7s} {'own FT':>7s} "
        f"{'at end':>7s} {'runs':>8s} {'tune s':>7s} {'joules':>7s} {'bytes':>8s}"
    )
    lines = [head, "-" * len(head)]
    for d in result["per_device"]:
        tune = "-" if d["finetune_seconds"] is None else f"{d['finetune_seconds']:.3f}"
        joules = "-" if d["joules"] is None else f"{d['joules']:.3f}"
        lines.append(
            f"{d['device']:30s} {'yes' if d['labelled'] else 'no':>6s} "
            f"{d['cluster'] or '-':>7s} {_pct(d['accuracy_initial']):>7s} "
            f"{_pct(d['accuracy_own']):>7s} {_pct(d['accuracy_end']):>7s} {d['runs']:>8s} "
            f"{tune:>7s} {joules:>7s} {d['bytes_sent']:8d}"
        )
    lines.append("why each runs what it runs:")
    for d in result["per_device"]:
        lines.append(f"  {d['device']}: {d['why']}")
    for r in result["runs"]:
        # a run the coordinator started by itself near the end may still be going: say so
        # rather than print clusters with a blank outcome
        going = ", still going when the simulation ended" if r["seconds"] is None else ""
        lines.append(f"run {r['run']} ({r['trigger']}): {r['rounds']} round(s){going}")
        for name, c in r["clusters"].items():
            lines.append(f"  cluster {name} {c['members']}: {c['note'] or 'no outcome yet'}")
    lines.append(
        "before: accuracy before any fine-tune (after the drift); own FT: after the device's "
        "own first fine-tune; at end: with what it runs at the end (devices without labels: "
        "measured by the simulation on labels the device never had)"
    )
    lines.append(
        f"{result['devices']} devices (+{result['new_devices']} new without labels), "
        f"{result['dataset']}, broker: {result['broker']}, {result['duration_seconds']:.0f} s"
    )
    return "\n".join(lines)
