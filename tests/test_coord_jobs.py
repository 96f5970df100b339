"""Job table: the AWS IoT Jobs life cycle, timeouts from an injected clock, bounded retries."""

from __future__ import annotations

import itertools

import pytest

import coordinator.jobs as jobs_module
from coordinator.clock import ManualClock
from coordinator.jobs import JobError, JobState, JobTable
from coordinator.state_db import StateDB


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def open_jobs(tmp_path, clock) -> JobTable:
    counter = itertools.count(1)
    return JobTable(StateDB.in_dir(tmp_path), clock=clock, new_id=lambda: f"job-{next(counter)}")


def test_values_are_the_upper_case_names():
    assert [s.value for s in JobState] == [
        "QUEUED",
        "IN_PROGRESS",
        "SUCCEEDED",
        "FAILED",
        "REJECTED",
        "TIMED_OUT",
        "CANCELED",
        "REMOVED",
    ]


def test_happy_path_and_repeated_status_is_a_no_op(tmp_path, clock):
    jobs = open_jobs(tmp_path, clock)
    job = jobs.create("pi-1", timeout_s=60)
    assert job.state is JobState.QUEUED and job.deadline == clock() + 60
    jobs.report_status(job.job_id, "IN_PROGRESS", device_id="pi-1")
    done = jobs.report_status(job.job_id, JobState.SUCCEEDED, device_id="pi-1", detail="acc 0.93")
    assert done.state is JobState.SUCCEEDED and done.detail == "acc 0.93"
    again = jobs.report_status(job.job_id, JobState.SUCCEEDED, device_id="pi-1")
    assert again == done


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ([JobState.SUCCEEDED], JobState.IN_PROGRESS),
        ([JobState.FAILED], JobState.SUCCEEDED),
        ([JobState.IN_PROGRESS], JobState.REJECTED),
        ([JobState.REJECTED], JobState.FAILED),
    ],
)
def test_terminal_states_are_final_and_transitions_validated(tmp_path, clock, path, refused):
    jobs = open_jobs(tmp_path, clock)
    job = jobs.create("pi-1", timeout_s=60)
    for state in path:
        jobs.report_status(job.job_id, state, device_id="pi-1")
    with pytest.raises(JobError, match="is not allowed"):
        jobs.report_status(job.job_id, refused, device_id="pi-1")


def test_device_may_set_only_its_own_states_on_its_own_jobs(tmp_path, clock):
    jobs = open_jobs(tmp_path, clock)
    job = jobs.create("pi-1", timeout_s=60)
    with pytest.raises(JobError, match="may not set"):
        jobs.report_status(job.job_id, JobState.CANCELED, device_id="pi-1")
    with pytest.raises(JobError, match="belongs to pi-1"):
        jobs.report_status(job.job_id, JobState.FAILED, device_id="pi-2")
    assert jobs.cancel(job.job_id).state is JobState.CANCELED
    with pytest.raises(JobError, match="terminal states are final"):
        jobs.remove(job.job_id)


def test_timeouts_come_from_the_clock(tmp_path, clock):
    jobs = open_jobs(tmp_path, clock)
    queued = jobs.create("pi-1", timeout_s=60)
    running = jobs.create("pi-2", timeout_s=120)
    jobs.report_status(running.job_id, JobState.IN_PROGRESS, device_id="pi-2")
    clock.advance(59)
    assert jobs.expire_overdue() == []
    clock.advance(1)
    assert [j.job_id for j in jobs.expire_overdue()] == [queued.job_id]
    clock.advance(60)
    timed_out = jobs.expire_overdue()
    assert [(j.job_id, j.state) for j in timed_out] == [(running.job_id, JobState.TIMED_OUT)]
    with pytest.raises(JobError):  # a result after the timeout does not resurrect the job
        jobs.report_status(running.job_id, JobState.SUCCEEDED, device_id="pi-2")


def test_retries_are_new_attempts_and_bounded(tmp_path, clock):
    jobs = open_jobs(tmp_path, clock)
    first = jobs.create("pi-1", timeout_s=60, max_attempts=2, round_id="r1")
    jobs.report_status(first.job_id, JobState.FAILED, device_id="pi-1", detail="oom")
    assert [j.job_id for j in jobs.retry_candidates()] == [first.job_id]
    second = jobs.retry(first.job_id)
    assert (second.attempt, second.retry_of, second.round_id) == (2, first.job_id, "r1")
    assert second.job_id != first.job_id and second.state is JobState.QUEUED
    with pytest.raises(JobError, match="already retried"):
        jobs.retry(first.job_id)
    clock.advance(61)
    jobs.expire_overdue()
    assert jobs.retry_candidates() == []
    with pytest.raises(JobError, match="attempt 2 of 2 was the last"):
        jobs.retry(second.job_id)


def test_rejected_jobs_are_not_retried(tmp_path, clock):
    jobs = open_jobs(tmp_path, clock)
    job = jobs.create("pi-1", timeout_s=60, max_attempts=3)
    jobs.report_status(job.job_id, JobState.REJECTED, device_id="pi-1", detail="busy")
    assert not jobs.can_retry(jobs.require(job.job_id))


def test_job_table_survives_restart(tmp_path, clock):
    jobs = open_jobs(tmp_path, clock)
    job = jobs.create("pi-1", timeout_s=60, round_id="r1", trigger="drift")
    jobs.report_status(job.job_id, JobState.IN_PROGRESS, device_id="pi-1")
    restarted = JobTable(StateDB.in_dir(tmp_path), clock=clock)
    assert restarted.require(job.job_id) == jobs.require(job.job_id)
    assert restarted.active_count() == 1
    assert restarted.latest_attempts("r1")["pi-1"].trigger == "drift"
    clock.advance(60)
    assert [j.job_id for j in restarted.expire_overdue()] == [job.job_id]


def test_round_progress_counts_the_active_and_succeeded_attempts_of_that_round_only(
    tmp_path, clock
):
    jobs = open_jobs(tmp_path, clock)
    made = [jobs.create(f"pi-{i}", timeout_s=60, round_id="r1") for i in range(5)]
    jobs.create("pi-9", timeout_s=60, round_id="r2")
    jobs.report_status(made[0].job_id, JobState.IN_PROGRESS, device_id="pi-0")
    jobs.report_status(made[1].job_id, JobState.SUCCEEDED, device_id="pi-1")
    jobs.report_status(made[2].job_id, JobState.SUCCEEDED, device_id="pi-2")
    jobs.report_status(made[3].job_id, JobState.FAILED, device_id="pi-3")
    assert jobs.round_progress("r1") == (2, 2)  # pi-0 and pi-4 active
    assert jobs.round_progress("r2") == (1, 0)
    assert jobs.round_progress("none") == (0, 0)


def test_the_ticks_overdue_check_is_an_index_range_and_its_round_count_reads_only_the_index(
    tmp_path, clock
):
    """The statements expire_overdue and round_progress run, as they run them: the overdue
    active jobs found by a range of (state, deadline), not by reading every active job; a
    round's jobs counted from the (round_id, state) index without reading a job row."""
    jobs = open_jobs(tmp_path, clock)
    jobs.create("pi-1", timeout_s=60, round_id="r")
    ran: list[str] = []
    jobs._db.trace(ran.append)  # expanded: the parameters are in the text
    jobs.expire_overdue()
    jobs.round_progress("r")
    jobs._db.trace(None)
    overdue, counted = (sql for sql in ran if sql.lstrip().upper().startswith("SELECT"))

    def plan(sql: str) -> str:
        return " ".join(row[3] for row in jobs._db.query("EXPLAIN QUERY PLAN " + sql))

    assert "INDEX jobs_by_state_deadline (state=? AND deadline<?)" in plan(overdue)
    assert "COVERING INDEX jobs_by_round_state (round_id=?)" in plan(counted)


def test_a_state_dir_with_the_earlier_job_indexes_opens_with_the_new_ones(tmp_path, clock):
    db = StateDB.in_dir(tmp_path)
    table = jobs_module._SCHEMA.split("CREATE INDEX")[0]  # the table is as it was
    db.ensure_schema(
        table + "CREATE INDEX jobs_by_state ON jobs (state);"
        "CREATE INDEX jobs_by_round ON jobs (round_id);"
    )
    db.close()
    jobs = open_jobs(tmp_path, clock)
    names = {r[0] for r in jobs._db.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_by_state_deadline", "jobs_by_round_state"} <= names
    assert not names & {"jobs_by_state", "jobs_by_round"}


def counted_in_sql(jobs: JobTable) -> dict[JobState, int]:
    rows = jobs._db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
    return {JobState(state): n for state, n in rows}


def test_jobs_counted_by_state_follow_commits_not_rollbacks_and_a_restart_counts_them_again(
    tmp_path, clock
):
    jobs = open_jobs(tmp_path, clock)
    first, second = (jobs.create(d, timeout_s=60) for d in ("pi-1", "pi-2"))
    jobs.report_status(first.job_id, JobState.IN_PROGRESS, device_id="pi-1")
    jobs.report_status(first.job_id, JobState.SUCCEEDED, device_id="pi-1")
    committed = {JobState.QUEUED: 1, JobState.SUCCEEDED: 1}
    assert jobs.count_by_state() == committed == counted_in_sql(jobs)
    assert jobs.active_count() == 1
    with pytest.raises(RuntimeError), jobs._db.transaction():
        jobs.create("pi-3", timeout_s=60)
        jobs.report_status(second.job_id, JobState.FAILED, device_id="pi-2")
        assert jobs.count_by_state() == committed  # not until it commits
        raise RuntimeError("the batch failed")
    assert jobs.count_by_state() == committed == counted_in_sql(jobs)
    with jobs._db.transaction():
        jobs.create("pi-3", timeout_s=60)
        jobs.report_status(second.job_id, JobState.FAILED, device_id="pi-2")
    assert jobs.count_by_state() == counted_in_sql(jobs) == {
        JobState.QUEUED: 1, JobState.SUCCEEDED: 1, JobState.FAILED: 1
    }  # fmt: skip
    assert JobTable(StateDB.in_dir(tmp_path), clock=clock).count_by_state() == counted_in_sql(jobs)
