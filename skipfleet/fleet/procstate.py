"""What /proc says about an agent process (Linux): stopped by a signal, resident memory."""

from __future__ import annotations

import time

from skipfleet.processes import rss_bytes

SIGNAL_SETTLE_S = 2.0  # how long SIGSTOP/SIGCONT may take to show in /proc


def rss(pid: int) -> int | None:
    try:
        return rss_bytes(pid)[0]
    except (OSError, KeyError):  # it died meanwhile, or a zombie without VmRSS
        return None


def is_stopped(pid: int) -> bool:
    """Job-control stopped (SIGSTOP): /proc is the truth, whoever sent the signal."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def wait_stopped(pid: int, stopped: bool) -> None:
    # Signals are delivered asynchronously: wait so that the answer already shows the new state.
    deadline = time.monotonic() + SIGNAL_SETTLE_S
    while is_stopped(pid) is not stopped and time.monotonic() < deadline:
        time.sleep(0.005)
