"""Handing the heap's free pages back to the OS after fleet-wide reads, and fewer arenas.

Every few seconds the actor builds views of the whole fleet (the devices view the dashboard's
history samples, the metrics snapshot: one record a device), each on one of its concurrency
groups' threads, and the driver receives them. The records are freed once sent, but glibc keeps
freed memory in the arena of the thread that used it, so each process stays at the high-water
mark of every thread's largest view. malloc_trim(0) returns the free pages of every arena.

glibc also gives each allocating thread an arena of its own (up to eight per core), and each
keeps its own high-water mark: the driver's paho, worker, control and API threads and the
actor's concurrency groups. limit_arenas() caps them at two (measured at 3,000 devices: driver
peak 151 -> 121 MiB, actor 168 -> 150, the tree's peak 606 -> 569 MiB, CPU within the noise).

The cyclic garbage collector runs less often in the fleet and partition actors and, its full
collections, in the driver (tune_gc); no collection walks what the driver built to start
(freeze_startup_heap).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0  # a trim walks every arena: at most this often
# The driver trims after each dashboard history sample (every 2 s), not every 10 s: what a
# round's bursts left free (10,000 reports read and passed on) goes back before the actor's
# close, when the actor holds the round's reports and the tree is at its highest (10,000
# devices, alternated: the tree's peak 779-827 -> 753-793 MiB, CPU within the runs' spread).
# The actor keeps 10 s: trimming it every 2 s as well cost 3-5 % more coordinator CPU a round.
DRIVER_TRIM_EVERY_S = 2.0
ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)
# CPython's default (700, 10, 10) runs a young collection every 700 container allocations, and a
# full one each time the heap has grown by a quarter. An actor holds the whole fleet
# (a row a device, a round's reports) and allocates a few dozen objects a message, so a round
# of 5,000 devices ran 12 full collections at ~65 ms each: 18 % of its CPU (in process,
# FleetService, thread CPU: 5.2 -> 4.4 s with these). Almost all of its garbage is freed by
# reference counting; the collector only finds cycles, which a few thousand more allocations
# between collections leave alive a moment longer. The driver keeps CPython's young threshold:
# with these it held ~10 MiB more at the tree's peak (two alternated 10,000-device pairs: 185 /
# 187 against 173 / 173 MiB), where the margin to the 800 MiB target is thin. Its full
# collections it makes 10 times rarer (DRIVER_GC_THRESHOLDS): at 10,000 devices a round's
# in-flight messages outlive the young collections, so nearly every tenth one was followed by a
# full one (25 in a run of two rounds, ~40 ms each, 1.0 CPU-s; with these 3, 0.1 CPU-s).
GC_THRESHOLDS = (10_000, 10, 10)
DRIVER_GC_THRESHOLDS = (700, 10, 100)


def limit_arenas(environ: MutableMapping[str, str]) -> None:
    """At most ARENAS malloc arenas: for this process (mallopt; call it before threads
    start), and through MALLOC_ARENA_MAX for the processes it starts (a local Ray's raylet
    and workers: the fleet actor). A MALLOC_ARENA_MAX the operator set is kept."""
    environ.setdefault("MALLOC_ARENA_MAX", str(ARENAS))
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, int(environ["MALLOC_ARENA_MAX"]))


def tune_gc(thresholds: tuple[int, int, int] = GC_THRESHOLDS) -> None:
    """The collector's thresholds: by default those of a process that holds the fleet state."""
    gc.set_threshold(*thresholds)


def freeze_startup_heap() -> None:
    """Collects once, then leaves every object alive now out of the collector's later walks.

    A coordinator's driver holds ~90,000 tracked objects once started (Ray, paho, prometheus
    and its own modules), nearly all of which live as long as it does, and CPython's full
    collection walks them all: at 1,000 devices one ran in each round, ~50 ms of the driver's
    ~0.5-0.8 CPU-s. Frozen, the walk is of what was made since: 2-3 ms (at 10,000 devices the
    fleet's own objects make it ~40 ms again: DRIVER_GC_THRESHOLDS). Frozen objects are still
    freed by reference counting; the collection first frees every cycle there is now, and a
    start-up object that later ends in a cycle (one a reconnect replaces, say) is kept: once,
    not a leak that grows."""
    gc.collect()
    gc.freeze()


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _glibc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where there is none (musl, macOS)."""
    libc = _libc()
    trim: Callable[[int], object] | None = getattr(libc, "malloc_trim", None) if libc else None
    if trim is None:
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
