"""Time sources. Every decision that depends on time takes a clock, so tests move time by hand.

Wall-clock seconds (not time.monotonic) because deadlines are persisted and must still mean the
same instant after the coordinator restarts.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Returns seconds since the epoch, like time.time()."""


def system_clock() -> float:
    return time.time()


def boot_clock() -> float:
    """Seconds as they really pass, never set ahead or back, counting a suspend (Linux's
    CLOCK_BOOTTIME; time.monotonic, which does not, elsewhere)."""
    return time.clock_gettime(_BOOT) if _BOOT is not None else time.monotonic()


_BOOT: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class ManualClock:
    """A clock that moves only when told to: for tests and simulations."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError(f"a clock does not go back (advance by {seconds})")
        self._now += seconds
        return self._now
