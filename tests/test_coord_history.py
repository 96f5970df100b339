"""History older than the retention is deleted (coordinator.history): finished jobs, the command
log, reports' rows, ended rounds and runs. What is still deciding something is kept, however old."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.aggregation import AdapterShape
from coordinator.clock import ManualClock
from coordinator.config import DAY_S
from coordinator.fleet import Conflict
from coordinator.history import PRUNE_INTERVAL_S, STEP_BELIEVED_AFTER_S, HistoryPruner
from coordinator.jobs import JobState as StoredState
from coordinator.reports import arrays_blob
from coordinator.service import SCAN_INTERVAL_S, FleetService
from shared.protocol import JobKind, JobState
from tests.coord_fleet_helpers import finetune_jobs, jobs_in, make_config
from tests.coord_helpers import random_factors
from tests.test_coord_report_retention import full_round
from tests.test_coord_service import answer_canaries, finetune_all, join

HISTORY_DAYS = 30
PRUNED_TABLES = ("jobs", "command_jobs", "fit_reports", "rounds", "round_records", "runs",
                 "run_rounds")  # fmt: skip
KEPT_TABLES = ("devices", "adapters", "cluster_adapters", "rollouts", "canary_results")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def start(tmp_path, clock, **policy) -> FleetService:
    return FleetService(make_config(tmp_path, **policy), clock=clock)


def rows(service: FleetService, tables=PRUNED_TABLES + KEPT_TABLES) -> dict[str, int]:
    db = service.fleet.db
    return {t: db.query_one(f"SELECT count(*) FROM {t}")[0] for t in tables}


def pruner_of(service: FleetService, keep_s: float, clock: ManualClock, **kw) -> HistoryPruner:
    return HistoryPruner(service.fleet.db, service.fleet.jobs, keep_s, clock, steady=clock, **kw)


def scan_after(service: FleetService, clock: ManualClock, seconds: float) -> None:
    clock.advance(seconds)
    service.tick()  # its scan prunes


def test_the_default_retention_is_thirty_days(tmp_path, clock):
    assert make_config(tmp_path).history_s == HISTORY_DAYS * DAY_S


def test_history_older_than_the_retention_goes_and_what_the_fleet_runs_on_stays(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    full_round(service, devices)
    before = rows(service)
    assert all(before[t] > 0 for t in PRUNED_TABLES + KEPT_TABLES), str(before)

    scan_after(service, clock, HISTORY_DAYS * DAY_S + 3600)
    after = rows(service)
    assert {t: after[t] for t in PRUNED_TABLES} == {
        **dict.fromkeys(PRUNED_TABLES, 0),
        "fit_reports": 1,  # the cohort's newest: its adapter shape is read from it
    }
    assert {t: after[t] for t in KEPT_TABLES} == {t: before[t] for t in KEPT_TABLES}
    assert service.jobs() == [] and service.rounds() == [] and service.runs() == []
    assert service.fleet.jobs.count_by_state() == {}  # the deleted jobs are counted no more
    listed = [a["job_id"] for d in devices for a in service.device_adapters(d.device_id)]
    assert listed == [service.fleet.db.query_one("SELECT job_id FROM fit_reports")[0]]
    assert {d["device_id"]: d["adapter_version"] for d in service.devices()} == dict.fromkeys(
        ("pi-1", "pi-2", "pi-3"), 1
    )
    assert service.adapters()[0]["current_version"] == 1

    full_round(service, devices)  # the fleet goes on from what it kept
    assert {d["adapter_version"] for d in service.devices()} == {2}


def test_nothing_younger_than_the_retention_goes(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    full_round(service, devices)
    before = rows(service)
    scan_after(service, clock, HISTORY_DAYS * DAY_S - 3600)
    assert rows(service) == before


def test_a_cohort_keeps_its_shape_through_a_restart_after_its_old_reports_went(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    full_round(service, devices)
    full_round(service, devices)
    scan_after(service, clock, HISTORY_DAYS * DAY_S + 3600)
    assert rows(service, ("fit_reports",)) == {"fit_reports": 1}
    service.close()

    restarted = start(tmp_path, clock)
    restarted.ingest([d.heartbeat() for d in devices])
    jobs = finetune_jobs(restarted)
    other = AdapterShape(layer_dims=(7, 5, 3), n_classes=3)
    wrong = random_factors(np.random.default_rng(3), shape=other)
    restarted.ingest(devices[0].finetune(jobs["pi-1"].job_id, arrays=wrong))
    refused = restarted.fleet.jobs.get(jobs["pi-1"].job_id)
    assert refused.state is StoredState.FAILED and "report refused" in refused.detail


def test_a_version_its_canary_rolled_back_is_still_refused_a_promotion_years_later(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    answer_canaries(service, devices, service.tick(), candidate=0.5, current=0.9)
    service.tick()
    (cohort,) = service.adapters()
    assert cohort["rollouts"][0]["state"] == "ROLLED_BACK"

    for _ in range(3):  # three years of passes
        scan_after(service, clock, 365 * DAY_S)
    assert rows(service, ("jobs", "rounds")) == {"jobs": 0, "rounds": 0}
    with pytest.raises(Conflict, match="rolled it back"):
        service.promote(cohort["cohort"], 1)


def test_a_running_round_its_active_jobs_and_held_reports_stay_however_old(tmp_path, clock):
    service = start(tmp_path, clock, round_deadline_s=120.0)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    jobs = finetune_jobs(service)
    for device in devices[:2]:  # pi-3 still training
        service.ingest(device.finetune(jobs[device.device_id].job_id))
    before = rows(service)
    pruner = pruner_of(service, 1.0, clock)
    with service.fleet.db.transaction():
        pruned = pruner.prune(cutoff=clock() + 1000 * DAY_S)
    assert pruned.total == 0 and rows(service) == before
    service.ingest(devices[2].finetune(jobs["pi-3"].job_id))
    service.tick()  # the round ends and is stored: every report it had is counted
    assert service.rounds()[0]["stage"] == "STORED"
    assert sorted(service.rounds()[0]["answered"]) == ["pi-1", "pi-2", "pi-3"]


def test_a_backlog_goes_a_batch_a_pass_with_passes_at_each_scan_until_it_is_gone(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    full_round(service, devices)
    jobs_before = rows(service, ("jobs",))["jobs"]
    assert jobs_before >= 6
    clock.advance(HISTORY_DAYS * DAY_S + 3600)
    pruner = pruner_of(service, HISTORY_DAYS * DAY_S, clock, batch_rows=2)
    deleted = []
    while (pruned := pruner.prune_if_due()) is not None:
        deleted.append(pruned.jobs)
        clock.advance(SCAN_INTERVAL_S)  # due again at once while a backlog waits
    assert sum(deleted) == jobs_before and max(deleted) == 2
    assert rows(service, PRUNED_TABLES) == {
        **dict.fromkeys(PRUNED_TABLES, 0),
        "fit_reports": 1,
    }
    clock.advance(PRUNE_INTERVAL_S - SCAN_INTERVAL_S)
    assert pruner.prune_if_due() is not None  # no backlog: the next pass a minute on


def test_old_rows_behind_one_still_active_go_all_the_same(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    service.evaluate(devices=["pi-1", "pi-2"], version=0)
    jobs = dict(jobs_in(service.tick(), JobKind.EVALUATE))
    # pi-1 never answers (its job stays QUEUED, in no round); pi-2 does
    service.ingest([devices[1].status(jobs["pi-2"].job_id, JobState.SUCCEEDED, {"accuracy": 0.8})])
    clock.advance(2 * DAY_S)
    pruner = pruner_of(service, DAY_S, clock, batch_rows=1)
    with service.fleet.db.transaction():
        first = pruner.prune(clock() - DAY_S)  # reads pi-1's job and command alone, keeps them
        second = pruner.prune(clock() - DAY_S)  # goes on behind them
    assert (first.jobs, first.commands, second.jobs, second.commands) == (0, 0, 1, 1)
    assert service.fleet.jobs.count_by_state() == {StoredState.QUEUED: 1}
    db = service.fleet.db
    assert [r[0] for r in db.query("SELECT job_id FROM jobs")] == [jobs["pi-1"].job_id]
    assert [r[0] for r in db.query("SELECT job_id FROM command_jobs")] == [jobs["pi-1"].job_id]


def test_a_run_still_going_keeps_its_ended_rounds_however_old(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    full_round(service, devices)
    service.fleet.db.execute("UPDATE runs SET state = 'RUNNING'")  # as a run between rounds
    pruner = pruner_of(service, 1.0, clock)
    with service.fleet.db.transaction():
        pruned = pruner.prune(cutoff=clock() + 1000 * DAY_S)
    assert (pruned.rounds, pruned.runs) == (0, 0)
    assert rows(service, ("rounds", "round_records", "run_rounds", "runs")) == dict.fromkeys(
        ("rounds", "round_records", "run_rounds", "runs"), 1
    )
    assert pruned.jobs > 0  # the round's finished jobs are history all the same


def test_reports_whose_arrays_an_earlier_version_kept_in_their_rows_go_once_released(
    tmp_path, clock
):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    full_round(service, devices)
    blob = arrays_blob(random_factors(np.random.default_rng(0)))
    service.fleet.db.execute("UPDATE fit_reports SET arrays = ?", (blob,))  # as it left them
    pruner = pruner_of(service, 1.0, clock)
    with service.fleet.db.transaction():
        assert pruner.prune(cutoff=clock() + 1000 * DAY_S).reports == 0
    scan_after(service, clock, HISTORY_DAYS * DAY_S + 3600)  # releases them, then prunes
    assert rows(service, ("fit_reports",)) == {"fit_reports": 1}


HISTORY_TABLES = (*PRUNED_TABLES, "rollouts", "canary_results")
NEW_INDEXES = ("rounds_by_outcome", "rollouts_by_state", "rollouts_by_cohort", "runs_by_state",
               "run_rounds_by_run", "round_records_by_start", "jobs_retryable")  # fmt: skip


def scanned_history_tables(db, statements: list[str]) -> list[str]:
    """The plan steps that read a table kept for history through all its rows: a scan with no
    LIMIT, or one whose rows are sorted before the LIMIT applies (a read whose cost grows with
    the history kept). A scan in rowid order under a LIMIT reads from one end and stops. Reports
    holding arrays are read through their partial index, which holds the running rounds' alone."""
    scans = []
    for sql in statements:
        if not sql.lstrip().upper().startswith("SELECT"):
            continue
        steps = [row[3] for row in db.query("EXPLAIN QUERY PLAN " + sql)]
        sorted_all = any(step.startswith("USE TEMP B-TREE FOR ORDER BY") for step in steps)
        bounded = " LIMIT " in sql.upper() and not sorted_all
        for step in steps:
            words = step.split()
            scans_all = words[:1] == ["SCAN"] and words[1] in HISTORY_TABLES and not bounded
            if scans_all and "fit_reports_holding" not in step:
                scans.append(f"{step} <= {sql.strip()[:100]}")
    return scans


def test_the_apis_lists_and_views_read_history_through_indexes_or_from_one_end(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    full_round(service, devices)
    db = service.fleet.db
    ran: list[str] = []
    db.trace(ran.append)
    views = (service.devices(), service.device("pi-1"), service.device_adapters("pi-1"),
             service.jobs(), service.rounds(), service.runs(), service.adapters(),
             service.health(), service.metrics_report())  # fmt: skip
    db.trace(None)
    assert all(views) and len(service.device_adapters("pi-1")) == 1
    assert scanned_history_tables(db, ran) == []


def test_a_ticks_scans_and_pruning_reads_of_history_go_through_indexes(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    full_round(service, devices)
    service.request_finetune(all_=True)  # a round running: what its ticks read
    service.tick()
    db = service.fleet.db
    ran: list[str] = []
    db.trace(ran.append)  # expanded: the parameters are in the text
    clock.advance(0.5)
    service.tick()
    clock.advance(SCAN_INTERVAL_S)
    service.tick()  # with a scan
    with db.transaction():
        service.fleet.history.prune(clock() - 1.0)
    db.trace(None)
    assert len(ran) > 20
    assert scanned_history_tables(db, ran) == []
    # the failed jobs a tick may retry: a range of those that ended within a request's life
    retries = [sql for sql in ran if "INDEXED BY jobs_retryable" in sql]
    assert retries
    for sql in retries:
        plan = " ".join(row[3] for row in db.query("EXPLAIN QUERY PLAN " + sql))
        assert "INDEX jobs_retryable (updated_at>?)" in plan


def test_a_state_dir_from_before_gets_the_history_tables_indexes_when_it_opens(tmp_path, clock):
    service = start(tmp_path, clock)
    for name in NEW_INDEXES:
        service.fleet.db.execute(f"DROP INDEX {name}")
    service.close()
    reopened = start(tmp_path, clock)
    query = "SELECT name FROM sqlite_master WHERE type = 'index'"
    assert set(NEW_INDEXES) <= {r[0] for r in reopened.fleet.db.query(query)}


class SettableClock:
    """A wall clock an operator (or NTP) may set ahead and back."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def finished_jobs(service: FleetService, count: int, every_s: float = 0.0) -> list[str]:
    made = []
    for index in range(count):
        job = service.fleet.jobs.create(f"pi-{index}", timeout_s=60)
        service.fleet.jobs.cancel(job.job_id)
        made.append(job.job_id)
        service.fleet.clock.now += every_s  # type: ignore[attr-defined]
    return made


def test_a_clock_set_ahead_ages_nothing_and_one_set_back_holds_nothing_back(tmp_path):
    wall, steady = SettableClock(1_700_000_000.0), ManualClock(0.0)
    service = FleetService(make_config(tmp_path), clock=wall)
    pruner = HistoryPruner(service.fleet.db, service.fleet.jobs, HISTORY_DAYS * DAY_S, wall,
                           steady=steady)  # fmt: skip

    def passes(count: int) -> int:
        deleted = 0
        for _ in range(count):
            with service.fleet.db.transaction():
                pruned = pruner.prune_if_due()
            deleted += pruned.jobs if pruned else 0
            wall.now += SCAN_INTERVAL_S
            steady.advance(SCAN_INTERVAL_S)
        return deleted

    recent = finished_jobs(service, 5)
    started = wall.now
    assert passes(1) == 0
    wall.now = started + 40 * DAY_S  # set ahead for a few seconds: an hour ago is not 40 days
    assert passes(2) == 0
    (ahead,) = finished_jobs(service, 1)  # written while the clock was ahead
    wall.now = started + 3600  # set back: the next pass is due at once, not 40 days on
    steady.advance(3600)
    later = finished_jobs(service, 300, every_s=60)
    assert passes(1) == 0  # nothing is old yet
    wall.now += 36 * DAY_S
    steady.advance(36 * DAY_S)
    assert passes(3) == len(recent) + len(later)  # the job dated ahead holds none back
    remaining = [r[0] for r in service.fleet.db.query("SELECT job_id FROM jobs")]
    assert remaining == [ahead]  # kept until the clock reaches its date and the retention


def test_a_step_ahead_that_lasts_an_hour_is_believed_and_the_deletion_catches_up(tmp_path):
    """A host that started with its clock ten days slow, corrected by NTP: once the correction
    has held for STEP_BELIEVED_AFTER_S, history is kept for the retention again, not for ten
    days more."""
    wall, steady = SettableClock(1_700_000_000.0), ManualClock(0.0)
    service = FleetService(make_config(tmp_path), clock=wall)
    pruner = HistoryPruner(service.fleet.db, service.fleet.jobs, HISTORY_DAYS * DAY_S, wall,
                           steady=steady)  # fmt: skip
    jobs = finished_jobs(service, 5)  # written by the slow clock
    with service.fleet.db.transaction():
        assert pruner.prune_if_due().jobs == 0
    wall.now += 40 * DAY_S  # corrected: they are 40 days old by the right clock
    for held_s in (PRUNE_INTERVAL_S, STEP_BELIEVED_AFTER_S - PRUNE_INTERVAL_S, PRUNE_INTERVAL_S):
        wall.now += held_s
        steady.advance(held_s)
        with service.fleet.db.transaction():
            pruned = pruner.prune_if_due()
        if steady() < STEP_BELIEVED_AFTER_S + PRUNE_INTERVAL_S:
            assert pruned.jobs == 0  # not yet believed: nothing aged by the step
    assert pruned.jobs == len(jobs)
