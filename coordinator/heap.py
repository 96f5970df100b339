"""Handing the heap's free pages back to the OS after fleet-wide reads.

Every few seconds the actor builds views of the whole fleet (the devices view the dashboard's
history samples, the metrics snapshot: one record a device), each on one of its concurrency
groups' threads, and the driver receives them. The records are freed once sent, but glibc keeps
freed memory in the arena of the thread that used it, so each process stays at the high-water
mark of every thread's largest view. malloc_trim(0) returns the free pages of every arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0  # a trim walks every arena: at most this often


def _glibc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], object] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return lambda: trim(0)


class HeapTrimmer:
    """Calls the trim at most once every `every_s` seconds, however often it is asked."""

    def __init__(
        self,
        every_s: float = TRIM_EVERY_S,
        *,
        trim: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every_s = every_s
        self._trim = trim if trim is not None else _glibc_trim()
        self._clock = clock
        self._last: float | None = None

    def maybe_trim(self) -> bool:
        """Trims if it is time (and the C library can); True if it did."""
        now = self._clock()
        if self._trim is None or (self._last is not None and now - self._last < self._every_s):
            return False
        self._last = now
        self._trim()
        return True
