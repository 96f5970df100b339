"""The heap trimmer: at most once an interval, however often asked; a no-op without glibc. The
collector's thresholds: cycles are still collected, only after more allocations. The start-up
heap's freeze: what lives then is left out of later collections, cycles then and later freed."""

from __future__ import annotations

import gc
import threading
import weakref
from types import SimpleNamespace

import pytest

from coordinator.heap import GC_THRESHOLDS, HeapTrimmer, freeze_startup_heap, tune_gc


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


def cycle() -> weakref.ref[Node]:
    """A pair of Nodes only the collector can free, and a weak reference to one of them."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture
def unfrozen():
    """The test process's own collector as it was: nothing frozen afterwards."""
    yield
    gc.unfreeze()


def test_the_freeze_frees_the_cycles_of_start_up_and_leaves_what_lives_out_of_later_walks(unfrozen):
    gc.disable()  # no collection of its own between the cycle's making and the freeze
    try:
        garbage = cycle()
        living = Node()
        assert garbage() is not None and any(o is living for o in gc.get_objects())
    finally:
        gc.enable()
    freeze_startup_heap()
    assert garbage() is None  # collected before the freeze, not kept for good
    assert gc.get_freeze_count() > 0
    assert not any(o is living for o in gc.get_objects())  # no generation holds it: no walk
    later = cycle()
    gc.collect()
    assert later() is None  # what is made after the freeze is still collected


def test_the_driver_freezes_its_heap_and_sets_its_collector_once_started(monkeypatch, tmp_path):
    import argparse

    from coordinator import cli, heap, ray_runtime
    from coordinator.config import from_args

    steps: list[str] = []
    ended = threading.Event()
    ended.set()  # a coordinator a fault already ended: run() stops it at once
    started = SimpleNamespace(
        fatal=SimpleNamespace(event=ended, reason=None), stop=lambda: steps.append("stop")
    )
    monkeypatch.setattr(ray_runtime, "init_ray", lambda config: steps.append("ray"))
    monkeypatch.setattr(heap, "limit_arenas", lambda environ: None)
    monkeypatch.setattr(heap, "freeze_startup_heap", lambda: steps.append("freeze"))
    monkeypatch.setattr(heap, "tune_gc", lambda thresholds: steps.append(f"gc {thresholds}"))
    monkeypatch.setattr(cli, "_start", lambda config: steps.append("start") or started)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)  # pytest keeps its own
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["--state-dir", str(tmp_path), "--ray-address", "auto"])
    assert cli.run(from_args(args, {})) == 0
    assert steps == ["ray", "start", "freeze", f"gc {heap.DRIVER_GC_THRESHOLDS}", "stop"]
