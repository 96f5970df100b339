"""The run book's reads of running runs: a body parsed once while it is unchanged, and every
read a Run of its own (a caller changing one changes nothing another read returns)."""

from __future__ import annotations

import copy
import threading
from types import SimpleNamespace

import pytest

import coordinator.runs as runs_module
from coordinator.federation import FederationPolicy, Measured, RunProgress
from coordinator.runs import ClusterRun, ClusterStage, Run, RunBook, RunState
from coordinator.state_db import StateDB
from coordinator.stuck import AGGREGATION_TIMEOUT_S, STUCK_GRACE_S, stuck_work

POLICY = FederationPolicy()


@pytest.fixture
def book(tmp_path):
    db = StateDB(tmp_path / "state.sqlite3")
    yield RunBook(db, POLICY)
    db.close()


def a_run(run_id: str = "run-1", members: int = 3) -> Run:
    ids = tuple(f"dev-{i}" for i in range(members))
    progress = RunProgress(POLICY, {0: {d: Measured(0.8, 0.4) for d in ids}}, rounds_done=1)
    cluster = ClusterRun("c0", ids, 0, progress, aggregates={1: 5})
    return Run(run_id, "fan", "operator", 100.0, {"c0": cluster}, rounds=["round-1"])


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """The bodies the run book parses, counted."""
    parsed: list[str] = []
    real = runs_module.json.loads

    def counting(text, *args, **kwargs):
        parsed.append(text)
        return real(text, *args, **kwargs)

    monkeypatch.setattr(runs_module.json, "loads", counting)
    return parsed


def test_an_unchanged_running_run_is_parsed_once_however_often_it_is_read(book, parses):
    book.save(a_run())
    for _ in range(5):
        (run,) = book.running()
        assert run.run_id == "run-1"
    assert book.get("run-1") is not None and book.active("fan") is not None
    assert len(parses) == 1


def test_a_saved_change_is_read_back_and_parsed_again(book, parses):
    book.save(a_run())
    (run,) = book.running()
    run.clusters["c0"].stage = ClusterStage.AGGREGATING
    run.rounds.append("round-2")
    book.save(run)
    (again,) = book.running()
    assert again.clusters["c0"].stage is ClusterStage.AGGREGATING
    assert again.rounds == ["round-1", "round-2"]
    assert len(parses) == 2


def test_a_run_read_is_its_own_changing_it_unsaved_changes_no_other_read(book):
    book.save(a_run())
    (first,) = book.running()
    first.rounds.append("round-2")
    first.clusters["c0"].aggregates[2] = 6
    first.clusters["c0"].progress.measured[0]["dev-0"] = Measured(0.1, 9.0)
    first.clusters["c0"].progress.measured[1] = {}
    (second,) = book.running()
    assert second.rounds == ["round-1"]
    assert second.clusters["c0"].aggregates == {1: 5}
    assert second.clusters["c0"].progress.measured == {
        0: {d: Measured(0.8, 0.4) for d in ("dev-0", "dev-1", "dev-2")}
    }
    assert second == book.get("run-1")


def test_a_change_rolled_back_is_not_read(book):
    book.save(a_run())
    book.running()
    with pytest.raises(RuntimeError), book._db.transaction():
        (run,) = book.running()
        run.clusters["c0"].stage = ClusterStage.DONE
        book.save(run)
        assert book.running()[0].clusters["c0"].stage is ClusterStage.DONE  # its own write
        raise RuntimeError("the transaction fails")
    assert book.running()[0].clusters["c0"].stage is ClusterStage.TRAINING


def test_an_ended_run_is_no_longer_kept_parsed(book):
    book.save(a_run("run-1"))
    book.save(a_run("run-2"))
    assert {r.run_id for r in book.running()} == {"run-1", "run-2"}
    (run,) = [r for r in book.running() if r.run_id == "run-1"]
    run.state = RunState.DONE
    book.save(run)
    assert [r.run_id for r in book.running()] == ["run-2"]
    assert set(book._parsed()) == {"run-2"}


def test_running_in_stage_builds_only_the_runs_with_a_cluster_in_those_stages(book, monkeypatch):
    training, rolling = a_run("run-1"), a_run("run-2")
    rolling.clusters["c0"].stage = ClusterStage.ROLLING_OUT
    book.save(training)
    book.save(rolling)
    built: list[str] = []
    real = runs_module._load

    def counting(body, policy):
        built.append(body["run_id"])
        return real(body, policy)

    monkeypatch.setattr(runs_module, "_load", counting)
    wanted = (ClusterStage.AGGREGATING, ClusterStage.ROLLING_OUT)
    assert [r.run_id for r in book.running(in_stage=wanted)] == ["run-2"]
    assert built == ["run-2"]  # the training run was not built
    assert book.running(in_stage=(ClusterStage.AGGREGATING,)) == []
    assert [r.run_id for r in book.running()] == ["run-1", "run-2"]


def test_running_count_counts_the_running_runs_only(book):
    assert book.running_count() == 0
    book.save(a_run("run-1"))
    done = a_run("run-2")
    done.state = RunState.DONE
    book.save(done)
    assert book.running_count() == 1 == len(book.running())


def test_changing_every_field_of_a_run_read_leaves_the_kept_parse_as_it_was(book):
    book.save(a_run())
    (run,) = book.running()
    kept = copy.deepcopy(book._parsed())
    run.state, run.finished_at = RunState.DONE, 5.0
    run.rounds.append("round-2")
    cluster = run.clusters["c0"]
    cluster.members += ("dev-9",)
    cluster.outliers += ("dev-0",)
    cluster.stage, cluster.note, cluster.candidate = ClusterStage.DONE, "changed", 7
    cluster.aggregates[2] = 6
    cluster.progress.measured[0]["dev-0"] = Measured(0.0, 1.0)
    cluster.progress.rounds_done = 9
    run.clusters["c1"] = cluster
    assert book._parsed() == kept


def test_a_second_thread_reading_the_runs_keeps_its_own_parse(book, parses):
    book.save(a_run())
    book.running()
    seen = []
    reader = threading.Thread(target=lambda: seen.append(book.running()))
    reader.start()
    reader.join()
    assert [r.run_id for r in seen[0]] == ["run-1"]
    book.running()  # this thread's parse is still there
    assert len(parses) == 2  # once on each thread


def test_stuck_work_names_a_run_aggregating_past_its_timeout_and_not_one_still_training(book):
    training, aggregating = a_run("run-1"), a_run("run-2")
    aggregating.clusters["c0"].stage = ClusterStage.AGGREGATING
    aggregating.clusters["c0"].aggregating_since = 1.0
    book.save(training)
    book.save(aggregating)
    fleet = SimpleNamespace(
        clock=lambda: 1.0 + AGGREGATION_TIMEOUT_S + STUCK_GRACE_S + 1.0,
        rounds=SimpleNamespace(open_rounds=lambda: []),
        runs=book,
        rollouts=SimpleNamespace(overdue=lambda before: []),
    )
    (item,) = stuck_work(fleet)
    assert (item["kind"], item["id"], item["stage"]) == ("run", "run-2", "AGGREGATING")


def test_is_running_says_whether_a_cohort_has_a_run_going_without_parsing_it(book, parses):
    assert not book.is_running("fan")
    book.save(a_run("run-1"))
    assert book.is_running("fan") and not book.is_running("other")
    done = a_run("run-1")
    done.state = RunState.DONE
    book.save(done)
    assert not book.is_running("fan")
    assert parses == []
