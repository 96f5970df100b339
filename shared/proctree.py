"""Process trees from /proc (Linux, stdlib only): who a process started, and stopping them all.

A process is named by (pid, start time): a pid alone may be reused by an unrelated process
between a snapshot and a kill. Used by the coordinator's reaper (coordinator.reaper) and by
`skipfleet simulate` to make sure nothing they started outlives them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    start: int  # clock ticks after boot: with the pid, names this process for good
    state: str  # R, S, D, Z (zombie: exited, not yet reaped), ...

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.start


def read(pid: int) -> Proc | None:
    """The process `pid` now, or None if there is none."""
    try:  # open() on a str path, not pathlib: the reaper reads every process 4 times a second
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            text = stat.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and ')', so split after the last ')'
    fields = text[text.rindex(")") + 2 :].split()
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[19]), fields[0])


def snapshot() -> dict[int, Proc]:
    procs = {}
    for name in os.listdir(PROC):
        if name.isdigit() and (proc := read(int(name))) is not None:
            procs[proc.pid] = proc
    return procs


def descendants(pid: int, procs: dict[int, Proc] | None = None) -> list[Proc]:
    """Every living process below `pid` (children, their children, ...)."""
    procs = snapshot() if procs is None else procs
    children: dict[int, list[Proc]] = {}
    for proc in procs.values():
        children.setdefault(proc.ppid, []).append(proc)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def group(pgid: int, procs: dict[int, Proc] | None = None) -> list[Proc]:
    procs = snapshot() if procs is None else procs
    return [proc for proc in procs.values() if proc.pgid == pgid]


def alive(key: tuple[int, int]) -> bool:
    """The very process (pid, start) still runs (a zombie has exited: it does not)."""
    proc = read(key[0])
    return proc is not None and proc.start == key[1] and proc.state != "Z"


def terminate(keys: set[tuple[int, int]], grace_s: float = 2.0) -> list[int]:
    """SIGTERM each process still alive, SIGKILL those alive `grace_s` later (Ray's agents may
    ignore SIGTERM). Returns the pids that were still running."""
    running = {key for key in keys if alive(key) and key[0] != os.getpid()}
    _signal(running, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(key) for key in running):
        time.sleep(0.05)
    _signal({key for key in running if alive(key)}, signal.SIGKILL)
    return sorted(pid for pid, _ in running)


def _signal(keys: set[tuple[int, int]], sig: signal.Signals) -> None:
    for pid, _ in keys:
        # gone meanwhile (its pid cannot be someone else's yet: we checked it just now)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
