"""The job runner: admission rules, one job at a time, life cycle, cancel, persisted history."""

from __future__ import annotations

import queue
import threading

import pytest

from agent.job_history import JobHistory
from agent.job_progress import ProgressNotice
from agent.jobs import CancelResult, JobFailed, JobOutcome, JobRejected, JobRunner
from shared.protocol.enums import JobKind, JobReason, JobState
from shared.protocol.messages import (
    ApplyAdapterParams,
    CancelParams,
    EvaluateParams,
    FinetuneParams,
    Job,
    JobStatus,
    RollbackAdapterParams,
)

NOW = 1_700_000_000.0
HASH = "base-hash"


def finetune_job(job_id, expires_at=NOW + 600, base_model_hash=None):
    return Job(
        job_id,
        JobKind.FINETUNE,
        FinetuneParams(epochs=1, lr=0.1, seed=0),
        expires_at=expires_at,
        base_model_hash=base_model_hash,
    )


def evaluate_job(job_id):
    return Job(job_id, JobKind.EVALUATE, EvaluateParams(), expires_at=NOW + 600)


def cancel_job(job_id, target):
    return Job(job_id, JobKind.CANCEL, CancelParams(target), expires_at=NOW + 600)


class Harness:
    def __init__(self, tmp_path, handlers=None, max_queued=2, in_progress_after=0.0):
        self.statuses: queue.Queue = queue.Queue()
        self.clock = [NOW]
        self.gate = threading.Event()  # the blocking handler waits on this
        self.started = threading.Event()
        self.history_path = tmp_path / "jobs.json"
        self.history = JobHistory(self.history_path, clock=lambda: self.clock[0])
        self.runner = JobRunner(
            handlers or {JobKind.FINETUNE: self.blocking, JobKind.EVALUATE: self.quick},
            self.statuses.put,
            self.history,
            base_model_hash=HASH,
            max_queued=max_queued,
            progress_interval_seconds=0,
            in_progress_after_seconds=in_progress_after,  # 0: every IN_PROGRESS, to follow it
            clock=lambda: self.clock[0],
        )

    def blocking(self, job, ctx):
        self.started.set()
        while not self.gate.wait(0.01):
            if ctx.cancel.is_set():
                raise RuntimeError("trainer noticed the cancel")  # like trainer Cancelled
        ctx.progress(0.5)
        return JobOutcome({"epochs": 1})

    def quick(self, job, ctx):
        return JobOutcome({"accuracy": 0.9})

    def next_status(self, timeout=5.0):
        return self.statuses.get(timeout=timeout)

    def states_until_terminal(self, job_id):
        states = []
        while True:
            status = self.next_status()
            assert status.job_id == job_id
            states.append(status.state)
            if status.terminal:
                return states, status


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    h.runner.start()
    yield h
    h.gate.set()
    h.runner.stop()


def test_a_job_goes_in_progress_then_succeeded_with_detail(harness):
    harness.gate.set()
    assert harness.runner.submit(finetune_job("j1")) is None
    states, final = harness.states_until_terminal("j1")
    assert states == [JobState.IN_PROGRESS, JobState.IN_PROGRESS, JobState.SUCCEEDED]
    assert final.detail == {"epochs": 1}
    assert harness.history.get("j1").state is JobState.SUCCEEDED


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        (finetune_job("old", expires_at=NOW - 1), JobReason.EXPIRED),
        (finetune_job("other", base_model_hash="another-hash"), JobReason.BASE_MODEL_MISMATCH),
        (
            Job("r", JobKind.ROLLBACK_ADAPTER, RollbackAdapterParams(), expires_at=NOW + 60),
            JobReason.UNKNOWN_KIND,
        ),
    ],
)
def test_rejections_at_submit(harness, job, reason):
    status = harness.runner.submit(job)
    assert (status.state, status.reason_code) == (JobState.REJECTED, reason)
    assert harness.next_status() == status


def test_a_repeated_job_id_is_rejected_even_after_a_restart(tmp_path):
    first = Harness(tmp_path)
    first.gate.set()
    first.runner.start()
    first.runner.submit(evaluate_job("once"))
    first.states_until_terminal("once")
    first.runner.stop()
    second = Harness(tmp_path)  # a new process reading the same state dir
    status = second.runner.submit(evaluate_job("once"))
    assert status.reason_code is JobReason.DUPLICATE
    assert status.detail == {"previous_state": "succeeded"}


def test_one_job_at_a_time_and_a_bounded_queue(harness):
    harness.runner.submit(finetune_job("a"))
    assert harness.started.wait(5)
    assert harness.runner.busy_job_id == "a"
    assert harness.runner.submit(evaluate_job("b")) is None
    assert harness.runner.submit(evaluate_job("c")) is None
    busy = harness.runner.submit(evaluate_job("d"))
    assert busy.reason_code is JobReason.BUSY
    harness.gate.set()
    seen = [harness.next_status() for _ in range(8)]
    assert [(s.job_id, s.state) for s in seen] == [
        ("a", JobState.IN_PROGRESS),
        ("d", JobState.REJECTED),
        ("a", JobState.IN_PROGRESS),  # progress
        ("a", JobState.SUCCEEDED),
        ("b", JobState.IN_PROGRESS),
        ("b", JobState.SUCCEEDED),
        ("c", JobState.IN_PROGRESS),
        ("c", JobState.SUCCEEDED),
    ]


def test_cancel_a_running_job_fails_it_with_reason_canceled(harness):
    harness.runner.submit(finetune_job("long"))
    assert harness.started.wait(5)
    assert harness.runner.cancel("long") is CancelResult.CANCELLING_RUNNING
    _, final = harness.states_until_terminal("long")
    assert (final.state, final.reason_code) == (JobState.FAILED, JobReason.CANCELED)


def test_cancel_a_queued_job_rejects_it_without_running(harness):
    harness.runner.submit(finetune_job("first"))
    assert harness.started.wait(5)
    harness.runner.submit(evaluate_job("waiting"))
    assert harness.runner.cancel("waiting") is CancelResult.REMOVED_FROM_QUEUE
    assert harness.runner.cancel("nobody") is CancelResult.NOT_FOUND
    assert harness.next_status().state is JobState.IN_PROGRESS  # "first"
    cancelled = harness.next_status()
    assert (cancelled.job_id, cancelled.state, cancelled.reason_code) == (
        "waiting",
        JobState.REJECTED,
        JobReason.CANCELED,
    )


def test_a_job_that_expires_while_queued_is_rejected_when_its_turn_comes(harness):
    harness.runner.submit(finetune_job("first"))
    assert harness.started.wait(5)
    harness.runner.submit(finetune_job("short", expires_at=NOW + 5))
    harness.clock[0] = NOW + 10
    harness.gate.set()
    harness.states_until_terminal("first")
    status = harness.next_status()
    assert (status.job_id, status.reason_code) == ("short", JobReason.EXPIRED)


def test_handler_errors_become_rejected_or_failed(tmp_path):
    def refuse(job, ctx):
        raise JobRejected(JobReason.INVALID_PARAMS, "no such method")

    def fail(job, ctx):
        raise JobFailed(JobReason.ADAPTER_UNAVAILABLE, "nobody sent it")

    def crash(job, ctx):
        raise ZeroDivisionError("bug")

    h = Harness(
        tmp_path, {JobKind.FINETUNE: refuse, JobKind.EVALUATE: fail, JobKind.APPLY_ADAPTER: crash}
    )
    h.runner.start()
    try:
        h.runner.submit(finetune_job("r"))
        assert h.states_until_terminal("r")[1].reason_code is JobReason.INVALID_PARAMS
        h.runner.submit(evaluate_job("f"))
        final = h.states_until_terminal("f")[1]
        assert (final.state, final.reason_code) == (JobState.FAILED, JobReason.ADAPTER_UNAVAILABLE)
        h.runner.submit(Job("c", JobKind.APPLY_ADAPTER, ApplyAdapterParams(3), expires_at=NOW + 9))
        final = h.states_until_terminal("c")[1]
        assert (final.state, final.reason_code) == (JobState.FAILED, JobReason.INTERNAL_ERROR)
        assert "ZeroDivisionError" in final.reason
    finally:
        h.runner.stop()


def test_jobs_interrupted_by_a_stop_are_failed_at_the_next_start(tmp_path):
    first = Harness(tmp_path)
    first.runner.start()
    first.runner.submit(finetune_job("cut"))
    assert first.started.wait(5)
    # The process dies here (no stop, no terminal status): simulate by a fresh runner.
    second = Harness(tmp_path)
    second.runner.start()
    try:
        status = second.next_status()
        assert (status.job_id, status.state) == ("cut", JobState.FAILED)
        assert second.history.get("cut").state is JobState.FAILED
    finally:
        second.runner.stop()
        first.gate.set()
        first.runner.stop()


def test_history_prunes_long_expired_jobs(tmp_path):
    clock = [NOW]
    history = JobHistory(tmp_path / "h.json", clock=lambda: clock[0])
    history.record("old", NOW - 10, JobState.SUCCEEDED)
    clock[0] = NOW + 7200
    history.record("new", NOW + 7300, JobState.QUEUED)
    reloaded = JobHistory(tmp_path / "h.json")
    assert reloaded.get("old") is None
    assert reloaded.get("new").state is JobState.QUEUED


def test_corrupt_history_is_moved_aside(tmp_path):
    (tmp_path / "h.json").write_text("{not json")
    history = JobHistory(tmp_path / "h.json")
    assert history.get("x") is None
    assert (tmp_path / "h.corrupt").exists()


def test_stopping_the_agent_fails_the_running_job_saying_why(tmp_path):
    h = Harness(tmp_path)
    h.runner.start()
    h.runner.submit(finetune_job("busy"))
    assert h.started.wait(5)
    h.runner.stop()
    _, final = h.states_until_terminal("busy")
    assert (final.state, final.reason_code) == (JobState.FAILED, JobReason.CANCELED)
    assert "shutting down" in final.reason


def test_long_error_texts_are_clipped_so_the_status_still_goes_out(tmp_path):
    def crash(job, ctx):
        raise RuntimeError("x" * 5000)

    h = Harness(tmp_path, {JobKind.FINETUNE: crash})
    h.runner.start()
    try:
        h.runner.submit(finetune_job("long-error"))
        _, final = h.states_until_terminal("long-error")
        assert final.state is JobState.FAILED and len(final.reason) <= 500
        h.runner.reject("bad", JobReason.MALFORMED, "y" * 5000)
        assert len(h.next_status().reason) <= 500
    finally:
        h.runner.stop()


def test_a_cancel_job_stops_the_running_job_at_once_without_queueing(harness):
    harness.runner.submit(finetune_job("long"))
    assert harness.started.wait(5)
    harness.next_status()  # long: IN_PROGRESS
    done = harness.runner.submit(cancel_job("c1", "long"))
    assert (done.job_id, done.state) == ("c1", JobState.SUCCEEDED)
    assert done.detail == {"target_job_id": "long", "result": "cancelling_running"}
    assert harness.next_status() == done
    _, final = harness.states_until_terminal("long")
    assert (final.state, final.reason_code) == (JobState.FAILED, JobReason.CANCELED)
    assert harness.history.get("c1").state is JobState.SUCCEEDED


def test_a_cancel_job_removes_a_queued_job_even_when_the_queue_is_full(harness):
    harness.runner.submit(finetune_job("first"))
    assert harness.started.wait(5)
    harness.next_status()  # first: IN_PROGRESS
    harness.runner.submit(evaluate_job("w1"))
    harness.runner.submit(evaluate_job("w2"))  # the queue (2) is full now
    done = harness.runner.submit(cancel_job("c1", "w2"))
    assert done.detail["result"] == "removed_from_queue"
    removed = harness.next_status()
    assert (removed.job_id, removed.state, removed.reason_code) == (
        "w2",
        JobState.REJECTED,
        JobReason.CANCELED,
    )
    assert harness.next_status() == done
    harness.gate.set()
    harness.states_until_terminal("first")
    harness.states_until_terminal("w1")  # w2 never runs
    assert harness.statuses.empty()


@pytest.mark.parametrize(
    ("target", "target_state"), [("never-seen", "unknown"), ("done", "succeeded")]
)
def test_a_cancel_of_an_unknown_or_finished_job_is_rejected_saying_why(
    harness, target, target_state
):
    harness.gate.set()
    harness.runner.submit(evaluate_job("done"))
    harness.states_until_terminal("done")
    status = harness.runner.submit(cancel_job("c1", target))
    assert (status.state, status.reason_code) == (JobState.REJECTED, JobReason.NOTHING_TO_CANCEL)
    assert status.detail == {"target_job_id": target, "target_state": target_state}
    assert harness.next_status() == status


def test_a_repeated_cancel_is_a_duplicate_naming_the_first_outcome(harness):
    first = harness.runner.submit(cancel_job("c1", "nobody"))
    assert first.state is JobState.REJECTED
    again = harness.runner.submit(cancel_job("c1", "nobody"))
    assert again.reason_code is JobReason.DUPLICATE
    assert again.detail == {"previous_state": "rejected"}


def test_tasks_between_jobs_run_on_the_worker_before_the_next_queued_job(harness):
    harness.runner.submit(finetune_job("first"))
    assert harness.started.wait(5)
    harness.runner.submit(evaluate_job("second"))

    def task():
        return threading.current_thread().name, harness.history.get("second").state

    future = harness.runner.run_between_jobs(task)
    assert not future.done()  # never alongside the running job
    harness.gate.set()
    assert future.result(timeout=5) == ("job-runner", JobState.QUEUED)
    harness.states_until_terminal("first")
    harness.states_until_terminal("second")


def test_a_task_error_reaches_its_future_and_stop_cancels_waiting_tasks(tmp_path):
    h = Harness(tmp_path)
    h.runner.start()
    failing = h.runner.run_between_jobs(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    h.runner.submit(finetune_job("busy"))
    assert h.started.wait(5)
    waiting = h.runner.run_between_jobs(lambda: "never")
    h.runner.stop()
    assert waiting.cancelled()
    assert h.runner.run_between_jobs(lambda: "late").cancelled()


def _started_harness(tmp_path, **options) -> Harness:
    h = Harness(tmp_path, **options)
    h.runner.start()
    return h


def test_a_job_that_ends_soon_after_it_arrived_sends_its_end_alone(tmp_path):
    h = _started_harness(tmp_path, in_progress_after=5.0)
    try:
        h.gate.set()
        h.runner.submit(finetune_job("quick"))
        status = h.next_status()
        assert (status.job_id, status.state) == ("quick", JobState.SUCCEEDED)
        h.clock[0] += 60  # its notice was cancelled with its end: nothing comes later
        assert h.runner.submit(evaluate_job("next")) is None
        assert h.next_status().job_id == "next"
        assert h.statuses.empty()
    finally:
        h.gate.set()
        h.runner.stop()


def test_a_job_that_waited_past_the_threshold_says_in_progress_when_it_starts(tmp_path):
    h = _started_harness(tmp_path, in_progress_after=5.0)
    try:
        h.runner.submit(finetune_job("long"))
        assert h.started.wait(5)
        h.runner.submit(evaluate_job("behind"))
        h.clock[0] += 6  # "behind" has waited 6 s when its turn comes
        h.gate.set()
        states = [(s.job_id, s.state) for s in (h.next_status() for _ in range(3))]
        # "long" ran 6 s too: its progress went out before its end
        assert states == [
            ("long", JobState.IN_PROGRESS),
            ("long", JobState.SUCCEEDED),
            ("behind", JobState.IN_PROGRESS),
        ]
        assert h.next_status().state is JobState.SUCCEEDED
    finally:
        h.gate.set()
        h.runner.stop()


def test_a_job_still_running_past_the_threshold_says_in_progress_without_progress(tmp_path):
    h = _started_harness(tmp_path, in_progress_after=0.1)  # the timer, on a silent handler
    try:
        h.runner.submit(finetune_job("waits"))
        assert h.next_status() == JobStatus("waits", JobState.IN_PROGRESS, progress=0.0)
        h.clock[0] += 1  # past the threshold on the runner's clock too: progress goes out
        h.gate.set()
        assert h.next_status().state is JobState.IN_PROGRESS  # its progress(0.5)
        assert h.next_status().state is JobState.SUCCEEDED
    finally:
        h.gate.set()
        h.runner.stop()


def test_a_job_whose_record_said_succeeded_sends_no_status_and_is_remembered(tmp_path):
    def reports(job, ctx):
        return JobOutcome({"accuracy": 0.9}, reported=True)

    h = _started_harness(tmp_path, handlers={JobKind.FINETUNE: reports}, in_progress_after=5.0)
    try:
        h.runner.submit(finetune_job("tuned"))
        for _ in range(500):  # the worker records the end; nothing is sent
            if h.history.get("tuned").state is JobState.SUCCEEDED:
                break
            threading.Event().wait(0.01)
        assert h.history.get("tuned").state is JobState.SUCCEEDED
        assert h.statuses.empty()
    finally:
        h.runner.stop()


def test_an_offered_job_is_taken_once_and_never_when_expired(harness):
    harness.gate.set()
    assert harness.runner.take_offer(evaluate_job("offer")) is True
    assert harness.next_status().state is JobState.IN_PROGRESS
    assert harness.next_status().state is JobState.SUCCEEDED
    assert harness.runner.take_offer(evaluate_job("offer")) is False  # re-delivered: no answer
    expired = Job("late", JobKind.EVALUATE, EvaluateParams(), expires_at=NOW - 1)
    assert harness.runner.take_offer(expired) is False
    assert harness.statuses.empty() and not harness.runner.knows("late")


def test_a_progress_notice_says_nothing_before_it_is_due_or_after_the_job_ended():
    sent, now = [], [NOW]
    notice = ProgressNotice("j", sent.append, arrived_at=NOW, after_s=5.0, interval_s=5.0,
                            clock=lambda: now[0])  # fmt: skip
    notice.progress(0.1)  # not due: 5 s after arrival
    now[0] += 6
    notice.progress(0.5)  # due: the first IN_PROGRESS, with the fraction
    notice.progress(0.6)  # within the interval
    now[0] += 5
    notice.progress(0.9)
    notice.end()
    now[0] += 60
    notice.progress(1.0)
    notice.start()  # a late timer, or a start after the end: nothing
    assert [(s.state, s.progress) for s in sent] == [
        (JobState.IN_PROGRESS, 0.5),
        (JobState.IN_PROGRESS, 0.9),
    ]
