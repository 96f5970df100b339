"""The live fleet dashboard: one page the coordinator's API serves, and the JSON it polls.

    GET /dashboard                     the page (coordinator/static/dashboard.html)
    GET /dashboard/static/{file}       its scripts, and Chart.js vendored from its npm package
    GET /dashboard/state               everything the page shows, as one JSON document

The registry keeps only each device's latest readings, so a FleetHistory samples them (a
HistorySampler thread, every SAMPLE_S: the readings of the devices whose records changed since
its last sample, the fleet state's device_readings view) and keeps each reading at the
coordinator's time of receipt: drift score, power, spool backlog per heartbeat, accuracy per
evaluation or fine-tune, and online/offline changes. It lives in the API's process: a restarted
coordinator's history starts empty (the state it shows beside it does not). The timeline adds
what the fleet state records (runs, rounds, canaries and their decisions) and, when the
coordinator is given a process fleet's events file, the faults injected with `skipfleet fleet`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.heap import DRIVER_TRIM_EVERY_S, HeapTrimmer

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript", ".html": "text/html", ".md": "text/markdown"}
SAMPLE_S = 2.0
HISTORY_POINTS = 1800  # per device and series: an hour of 2 s heartbeats
POINTS_SHOWN = 300  # per device and series in one state answer: a chart's width, not an hour
# Points kept over the whole fleet (16 bytes each: 32 MB): a large fleet keeps fewer a device,
# never fewer than a chart shows (10,000 devices: 300 a series, 144 MB at most).
FLEET_HISTORY_POINTS = 2_000_000
MAX_EVENTS = 2000  # online/offline changes kept
ROUNDS_SHOWN = 200
RUNS_SHOWN = 50
# series name -> the devices view's field, read whenever a new heartbeat arrived
# (when, what): an evaluation of what the device runs, and a fine-tune's result
ACCURACY_READINGS = (("accuracy_at", "accuracy"), ("last_finetune_at", "accuracy_after"))
Point = tuple[float, Any]  # (when, the reading)
View = dict[str, Any]  # one JSON-ready record of a fleet view (a device, a run, a round, ...)
HEARTBEAT_SERIES = {"drift": "confidence_score", "power": "power_w", "spool": "spool_depth"}


class Series:
    """One device's readings of one kind, oldest first: (when, value) as two arrays of float64
    (16 bytes a point; a deque of tuples took ~100), the newest `kept` of them."""

    __slots__ = ("times", "values")

    def __init__(self) -> None:
        self.times, self.values = array("d"), array("d")

    def add(self, t: float, value: float, kept: int) -> None:
        self.times.append(t)
        self.values.append(value)
        if len(self.times) > kept:
            del self.times[: len(self.times) - kept], self.values[: len(self.values) - kept]

    def points(self) -> list[Point]:
        return list(zip(self.times, self.values, strict=True))


class FleetHistory:
    """Bounded per-device time series, fed with the devices view (plain dicts)."""

    def __init__(
        self,
        points: int = HISTORY_POINTS,
        shown: int = POINTS_SHOWN,
        fleet_points: int = FLEET_HISTORY_POINTS,
    ) -> None:
        self._points, self._shown, self._fleet_points = points, shown, fleet_points
        self._kept = points  # per device and series, for the fleet's size
        self._series: dict[str, dict[str, Series]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # device -> the times last recorded
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()  # the sampler writes, API threads read

    @property
    def kept(self) -> int:
        """Points kept per device and series now (fewer, down to a chart's width, for a large
        fleet: fleet_points bounds the whole history)."""
        return self._kept

    def record(self, devices: list[dict[str, Any]], now: float) -> None:
        with self._lock:
            series = len(HEARTBEAT_SERIES) + 1  # and accuracy
            share = self._fleet_points // max(1, series * max(len(devices), len(self._series)))
            self._kept = max(min(self._points, self._shown), min(self._points, share))
            for device in devices:
                self._record_device(device, now)

    def _record_device(self, d: dict[str, Any], now: float) -> None:
        name = d["device_id"]
        last = self._last.setdefault(name, {})
        series = self._series.setdefault(name, {})

        def add(what: str, t: float | None, value: Any) -> None:
            if t is not None and isinstance(value, int | float):
                series.setdefault(what, Series()).add(t, value, self._kept)

        beat = d.get("last_heartbeat_at")
        if beat is not None and beat != last.get("beat"):
            last["beat"] = beat
            for what, field in HEARTBEAT_SERIES.items():
                add(what, beat, d.get(field))
        for at_field, value_field in ACCURACY_READINGS:
            at = d.get(at_field)
            if at is not None and at != last.get(at_field):
                last[at_field] = at
                add("accuracy", at, d.get(value_field))
        online = bool(d.get("online"))
        if last.get("online") != online:
            if "online" in last:  # a change, not the first sight
                at = d.get("presence_since") or now
                state = "online" if online else "offline"
                self._events.append(_event(at, "device", f"{name} {state}", device=name))
            last["online"] = online

    def series(self) -> dict[str, dict[str, list[Point]]]:
        with self._lock:
            return {
                device: {what: _thin(sorted(one.points()), self._shown) for what, one in by.items()}
                for device, by in self._series.items()
            }

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)


def _thin(points: list[Point], most: int) -> list[Point]:
    """At most `most` points, evenly spaced, the newest always among them."""
    if len(points) <= most:
        return points
    step = len(points) / most
    return [points[int(len(points) - 1 - i * step)] for i in range(most)][::-1]


class HistorySampler:
    """Calls `sample` every `interval` seconds in a daemon thread, until stopped."""

    def __init__(
        self,
        sample: Callable[[], object],
        interval: float = SAMPLE_S,
        heap: HeapTrimmer | None = None,
    ) -> None:
        self._sample, self._interval = sample, interval
        # each sample is a fleet-wide view, freed after it
        self._heap = heap or HeapTrimmer(DRIVER_TRIM_EVERY_S)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dashboard-history", daemon=True)

    def start(self) -> HistorySampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as err:  # the fleet state is away a moment: the next sample will do
                log.debug("dashboard history sample failed: %s", err)
            self._heap.maybe_trim()
            self._stop.wait(self._interval)


def read_fleet_events(path: Path | None) -> list[dict[str, Any]]:
    """The faults a process fleet's control endpoint logged (skipfleet.fleet.control), as
    timeline events; a missing file is no events, a torn last line is skipped."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    except OSError as err:
        log.warning("cannot read the fleet events file %s: %s", path, err)
        return []
    events = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # being written
        if not _is_fault(entry):  # an edited or foreign file must not break every state answer
            log.debug("skipping a fleet event that is not a fault entry: %.200s", line)
            continue
        target = entry.get("device") or "the broker"
        text = f"fault: {entry['action']} {target}"
        events.append(_event(entry["at"], "fault", text, device=entry.get("device")))
    return events


def _is_fault(entry: Any) -> bool:
    """{"at": seconds, "action": str, "device": str or None}, as skipfleet.fleet.control logs."""
    if not isinstance(entry, dict):
        return False
    at, action, device = entry.get("at"), entry.get("action"), entry.get("device")
    number = isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at)
    return number and isinstance(action, str) and (device is None or isinstance(device, str))


def rollouts(adapters: list[View]) -> list[dict[str, Any]]:
    """Every canary rollout, newest first, with each canary device's candidate and current
    accuracy (None where it did not answer) and why it was decided."""
    out = []
    for cohort in adapters:
        for r in cohort["rollouts"]:
            results = r.get("results") or {}
            out.append(
                {
                    "rollout_id": r["rollout_id"],
                    "cohort": r["cohort"],
                    "cluster": r["cluster"],
                    "candidate_version": r["candidate_version"],
                    "previous_version": r["previous_version"],
                    "state": r["state"],
                    "started_at": r["started_at"],
                    "decided_at": r["decided_at"],
                    "reason": r["reason"],
                    "canaries": [
                        {"device": d, **_canary(results.get(d))} for d in r["canary_devices"]
                    ],
                }
            )
    return sorted(out, key=lambda r: r["started_at"], reverse=True)


def _canary(result: View | None) -> dict[str, Any]:
    result = result or {}
    return {
        "candidate": result.get("accuracy_candidate"),
        "current": result.get("accuracy_current"),
        "failure": result.get("failure"),
    }


def _event(t: float, kind: str, text: str, **more: Any) -> dict[str, Any]:
    return {"t": t, "kind": kind, "text": text, **more}


def timeline(
    runs: list[View], rounds: list[View], rollouts_: list[View], *more: list[View]
) -> list[dict[str, Any]]:
    """What happened, oldest first: runs, rounds, canaries and decisions, and `more` (device
    online/offline changes, injected faults)."""
    events = [e for extra in more for e in extra]
    for run in runs:
        name = f"run {run['run_id'][:8]}"
        events.append(_event(run["started_at"], "run", f"{name} started ({run['trigger']})"))
        if run.get("finished_at"):
            events.append(_event(run["finished_at"], "run", f"{name} {run['state'].lower()}"))
    for r in rounds:
        name = f"round {r['round_id'][:8]}"
        events.append(_event(r["started_at"], "round", f"{name} started"))
        if r.get("finished_at"):
            failed = len(r.get("failures") or {})
            note = f", {failed} device(s) failed" if failed else ""
            events.append(_event(r["finished_at"], "round", f"{name} {r['stage'].lower()}{note}"))
    for r in rollouts_:
        what = f"v{r['candidate_version']} ({r['cohort']}/{r['cluster']})"
        canaries = ", ".join(c["device"] for c in r["canaries"])
        events.append(_event(r["started_at"], "canary", f"canary of {what} on {canaries}"))
        if r.get("decided_at"):
            kind = "promotion" if r["state"] == "PROMOTED" else "rollback"
            text = f"{what} {r['state'].lower()}: {r['reason'] or ''}"
            events.append(_event(r["decided_at"], kind, text))
    return sorted(events, key=lambda e: e["t"])


class Dashboard:
    """Assembles /dashboard/state from the fleet port, the history and the fleet events file."""

    def __init__(
        self,
        read: Callable[..., Any],
        history: FleetHistory,
        events_file: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read, self._history = read, history
        self._events_file, self._clock = events_file, clock
        self._since: dict[str, int] | None = None  # the readings' versions sampled so far

    def sample(self) -> None:
        """The readings of the devices that changed since the last sample, into the history."""
        answer: dict[str, Any] = self._read("device_readings", self._since)
        self._history.record(answer["devices"], self._clock())
        self._since = answer["since"]

    def state(self) -> dict[str, Any]:
        devices: list[dict[str, Any]] = self._read("devices")
        self._history.record(devices, self._clock())  # the charts never show less than the table
        runs = self._read("runs", RUNS_SHOWN)
        rounds = self._read("rounds", ROUNDS_SHOWN)
        canaries = rollouts(self._read("adapters"))
        events = timeline(
            runs, rounds, canaries, self._history.events(), read_fleet_events(self._events_file)
        )
        return {
            "now": self._clock(),
            "devices": devices,
            "history": self._history.series(),
            "runs": runs,
            "rounds": rounds,
            "rollouts": canaries,
            "events": events,
        }


def static_file(name: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of a file the page loads, None if there is no such file; `name` is
    one path segment (the API's route allows no slash), so nothing outside STATIC_DIR is served."""
    for folder in (STATIC_DIR, STATIC_DIR / "vendor"):
        path = folder / name
        if path.is_file() and path.suffix in STATIC_TYPES:
            return STATIC_TYPES[path.suffix], path.read_bytes()
    return None
