"""`fleet.json`: where a running process fleet tells others how to reach it.

Written atomically (temporary file + rename) by the process that owns the fleet on every
change, so a reader never sees half a file; read by `skipfleet fleet --run-dir`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from skipfleet.fleet.base import FleetUnavailable

RUN_STATE_FILE = "fleet.json"
CONTROL_TOKEN_FILE = "control-token"  # the control endpoint's bearer token, beside fleet.json
RUN_STATE_VERSION = 1
SIMULATE_FLEET_DIR = "fleet"  # where `skipfleet simulate` keeps its fleet, under the run dir


def fleet_dir_of(run_dir: Path) -> Path:
    """The dir holding fleet.json: `run_dir` itself, or, given the run dir simulate prints
    ("run dir ..."), its fleet/ sub-dir."""
    run_dir = Path(run_dir)
    nested = run_dir / SIMULATE_FLEET_DIR
    if not (run_dir / RUN_STATE_FILE).exists() and (nested / RUN_STATE_FILE).exists():
        return nested
    return run_dir


EVENTS_FILE = "events.jsonl"  # one JSON line per fault injected through the control endpoint


def log_event(run_dir: Path, action: str, device: str | None) -> None:
    """Appends {"at": wall time, "action", "device"} for the coordinator's dashboard timeline;
    one write of one line, so a reader sees whole lines (or a torn last one it skips)."""
    line = json.dumps({"at": time.time(), "action": action, "device": device}) + "\n"
    with open(Path(run_dir) / EVENTS_FILE, "a") as out:
        out.write(line)


def write_run_state(run_dir: Path, state: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=".fleet-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump({"version": RUN_STATE_VERSION, **state}, out, indent=2)
            out.write("\n")
        os.replace(tmp, run_dir / RUN_STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_run_state(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FleetUnavailable(f"{path}: no such file (is a fleet running there?)") from None
    except (OSError, ValueError) as err:
        raise FleetUnavailable(f"{path}: unreadable: {err}") from None
    if not isinstance(state, dict) or state.get("version") != RUN_STATE_VERSION:
        raise FleetUnavailable(f"{path}: not a version {RUN_STATE_VERSION} fleet run state")
    return state


def control_url_of(run_dir: Path) -> str:
    state = read_run_state(run_dir)
    url = state.get("control_url")
    if not state.get("running") or not url:
        raise FleetUnavailable(f"the fleet of {run_dir} is not running or serves no control URL")
    return url
