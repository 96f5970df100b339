"""`skipfleet bench shutdown`: how long a `skipfleet coordinator` on a local Ray takes to leave
nothing behind, stopped with SIGTERM or killed with SIGKILL, through a private mosquitto.

Per trial: the coordinator starts until /health answers; its processes are read from /proc
(shared.proctree); then the signal, and the seconds until the coordinator has exited and until
the last process it started (Ray's, its reaper) is gone, with what still ran after 30 s (the
orphans, and their resident memory).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

from shared import proctree

GIVE_UP_S = 30.0


def main(args) -> int:
    from skipfleet.brokers import MosquittoBroker

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shutdown-") as tmp:
        broker = MosquittoBroker(Path(tmp) / "broker")
        broker.start()
        try:
            for trial in range(args.trials):
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    rows.append(_trial(broker.url, Path(tmp) / f"{sig.name}-{trial}", sig))
                    print(_line(rows[-1]), flush=True)
        finally:
            broker.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(not row["left"] for row in rows) else 1


def _trial(broker_url: str, work: Path, sig: signal.Signals) -> dict:
    from skipfleet.coordinator_process import CoordinatorProcess

    coordinator = CoordinatorProcess(broker_url, work / "state", work / "coordinator.log")
    try:
        coordinator.wait_healthy(120)
        started = {p.key for p in proctree.descendants(coordinator.pid)}
        t0 = time.monotonic()
        os.kill(coordinator.pid, sig)
        coordinator.process.wait(GIVE_UP_S)
        exited = time.monotonic() - t0
        while any(proctree.alive(k) for k in started) and time.monotonic() - t0 < GIVE_UP_S:
            time.sleep(0.05)
        all_gone = time.monotonic() - t0
        left = [k[0] for k in started if proctree.alive(k)]
        return {"signal": sig.name, "processes": len(started), "exited_s": round(exited, 2),
                "all_gone_s": round(all_gone, 2), "left": left,
                "left_rss_mb": round(sum(_rss(pid) for pid in left) / 2**20, 1)}  # fmt: skip
    finally:
        coordinator.stop(5)


def _rss(pid: int) -> int:
    from skipfleet.processes import rss_bytes

    try:
        return rss_bytes(pid)[0]
    except (OSError, KeyError):
        return 0


def _line(row: dict) -> str:
    return (
        f"{row['signal']:8} {row['processes']:3d} processes  coordinator exited in "
        f"{row['exited_s']:5.2f} s  all gone in {row['all_gone_s']:5.2f} s  "
        f"left after {GIVE_UP_S:.0f} s: {len(row['left'])} ({row['left_rss_mb']} MB)"
    )
