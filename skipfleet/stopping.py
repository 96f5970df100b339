"""SIGTERM and SIGINT for a command that starts processes (`skipfleet simulate`).

Python's default SIGTERM ends the process on the spot: no `finally`, no ExitStack callback, so
the broker, the coordinator (and its Ray) and the agents it started kept running. Here the first
SIGTERM or SIGINT raises `Stopped` in the main thread instead, which unwinds like an exception:
every ExitStack stops what it started, in reverse order. Further signals are ignored meanwhile
(the orderly stop has deadlines of its own). `Stopped.started` names every process that ran
below this one when the signal came, so `sweep` can end whatever the orderly stop missed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from shared import proctree

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A stop signal arrived (a BaseException, as KeyboardInterrupt: `except Exception` clauses
    on the way must not swallow it)."""

    def __init__(self, signum: int, started: set[tuple[int, int]]) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.started = started

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process a signal ended


def _raise_stopped(signum: int, frame: object) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    started = {proc.key for proc in proctree.descendants(os.getpid())}
    raise Stopped(signum, started)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Stopped. Off the main thread (simulate run
    from a thread), where Python cannot set handlers, it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def sweep(stopped: Stopped, grace_s: float = 2.0) -> list[int]:
    """Ends (SIGTERM, then SIGKILL) what still runs of what ran when the signal came."""
    return proctree.terminate(stopped.started, grace_s)
