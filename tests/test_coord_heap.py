"""The heap trimmer: at most once an interval, however often asked; a no-op without glibc. The
collector's thresholds: cycles are still collected, only after more allocations."""

from __future__ import annotations

import gc
import weakref

from coordinator.heap import GC_THRESHOLDS, HeapTrimmer, tune_gc


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_trim_runs_at_most_once_an_interval():
    trims: list[float] = []
    clock = Clock()
    trimmer = HeapTrimmer(10.0, trim=lambda: trims.append(clock.now), clock=clock)
    asked = []
    for step in range(25):  # asked every 2 s for 48 s
        clock.now = 100.0 + 2 * step
        asked.append(trimmer.maybe_trim())
    assert trims == [100.0, 110.0, 120.0, 130.0, 140.0]
    assert sum(asked) == 5


def test_without_a_c_library_trim_nothing_is_trimmed(monkeypatch):
    from coordinator import heap

    monkeypatch.setattr(heap, "_glibc_trim", lambda: None)
    assert HeapTrimmer(0.0).maybe_trim() is False


def test_the_real_trim_runs_here():
    """This machine's glibc: the trim is found and runs (its effect is measured by the bench)."""
    assert HeapTrimmer(0.0).maybe_trim() is True


def test_the_arena_limit_reaches_the_processes_ray_starts_unless_the_operator_set_one():
    from coordinator.heap import ARENAS, limit_arenas

    environ: dict[str, str] = {}
    limit_arenas(environ)
    assert environ == {"MALLOC_ARENA_MAX": str(ARENAS)}
    operators = {"MALLOC_ARENA_MAX": "4"}
    limit_arenas(operators)
    assert operators == {"MALLOC_ARENA_MAX": "4"}


def test_the_driver_trims_its_heap_after_every_dashboard_history_sample():
    from coordinator.dashboard import SAMPLE_S, HistorySampler

    sampler = HistorySampler(lambda: None)
    assert sampler._interval == SAMPLE_S
    assert sampler._heap._every_s <= SAMPLE_S  # never two samples' fleet-wide views between trims


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_tuned_collector_still_frees_a_cycle_by_itself_after_more_allocations():
    old = gc.get_threshold()
    try:
        tune_gc()
        young = GC_THRESHOLDS[0]
        assert young > old[0]
        gc.collect()  # the young generation's count starts at 0
        first, second = Node(), Node()
        first.other, second.other = second, first  # garbage only the collector can free
        alive = weakref.ref(first)
        del first, second
        kept = [[] for _ in range(young // 2)]  # CPython's default would have collected
        assert alive() is not None
        kept += [[] for _ in range(young)]  # past the threshold: a young collection ran
        assert alive() is None
    finally:
        gc.set_threshold(*old)
