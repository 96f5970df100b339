"""The job runner: one job at a time on a worker thread, never in an MQTT callback.

Life cycle as the device sees it (it may set only IN_PROGRESS, SUCCEEDED, FAILED, REJECTED):
    submit -> REJECTED (expired | duplicate | unknown kind | base model mismatch | busy)
           -> queued (no status: QUEUED is the coordinator's) -> running
           -> SUCCEEDED | FAILED (error, or cancelled while running) | REJECTED (refused by the
              handler, e.g. adapter for another base model; or cancelled/expired while queued)
One message per job when it ends soon: IN_PROGRESS goes out only for a job still unfinished
`in_progress_after_seconds` after it arrived (agent.job_progress). A fine-tune's Report is its
SUCCEEDED (the handler says so with `JobOutcome.reported`): no status follows it.
A CANCEL job is carried out in `submit` (waiting in the queue behind its target would defeat
it): SUCCEEDED at once, or REJECTED `nothing_to_cancel`.
Accepted job ids are persisted (`JobHistory`) so a restart neither re-runs nor forgets them.
A job whose state cannot be written (disk full, or any other write error) ends FAILED
`disk_full` at once, not QUEUED until its deadline: a job the device cannot remember must not
run (a restart would run it again). The history still holds it in memory, so a repeat is
rejected as a duplicate while the agent runs.
Tasks given to `run_between_jobs` (adapter changes of the desired-state reconciler) run on the
worker thread too, before the next job, so they never overlap a job that reads the adapter.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

from agent.admission import admission_check
from agent.job_history import JobHistory
from agent.job_progress import ProgressNotice
from shared.protocol.checks import Scalar
from shared.protocol.enums import TERMINAL_STATES, JobKind, JobReason, JobState
from shared.protocol.messages import CancelParams, Job, JobStatus

log = logging.getLogger(__name__)


MAX_REASON_CHARS = 500  # JobStatus takes up to 1024; error texts can be longer


# errno values that mean "no room to write": a handler failing with one fails `disk_full`.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


def clip(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


class JobRejected(Exception):
    """Raised by a handler: the job cannot be run as asked (REJECTED, not FAILED)."""

    def __init__(self, reason_code: JobReason, message: str):
        super().__init__(message)
        self.reason_code = reason_code


class JobFailed(Exception):
    """Raised by a handler: the job ran and failed for a known reason."""

    def __init__(self, reason_code: JobReason, message: str):
        super().__init__(message)
        self.reason_code = reason_code


@dataclass(frozen=True)
class JobOutcome:
    detail: Mapping[str, Scalar] = field(default_factory=dict)
    # The handler sent the job's record (a fine-tune's Report), which says SUCCEEDED itself.
    reported: bool = False


@dataclass
class JobContext:
    """What a handler gets besides its job: a cancel flag to poll and a progress reporter."""

    cancel: threading.Event
    progress: Callable[[float], None]
    # Call before sending a record that is the job's end (a fine-tune's Report): no IN_PROGRESS
    # may follow it.
    ending: Callable[[], None] = lambda: None


Handler = Callable[[Job, JobContext], JobOutcome]
EmitStatus = Callable[[JobStatus], None]


class CancelResult(Enum):
    CANCELLING_RUNNING = "cancelling_running"  # the handler sees the flag at its next check
    REMOVED_FROM_QUEUE = "removed_from_queue"
    NOT_FOUND = "not_found"  # unknown, or already finished


class JobRunner:
    def __init__(
        self,
        handlers: Mapping[JobKind, Handler],
        emit: EmitStatus,
        history: JobHistory,
        *,
        base_model_hash: str,
        max_queued: int = 4,
        progress_interval_seconds: float = 5.0,
        in_progress_after_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ):
        self._handlers = dict(handlers)
        self._emit = emit
        self._history = history
        self._base_model_hash = base_model_hash
        self._max_queued = max_queued
        self._progress_interval = progress_interval_seconds
        self._in_progress_after = in_progress_after_seconds
        self._arrived: dict[str, float] = {}  # queued job id -> when it arrived
        self._clock = clock
        self._lock = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._tasks: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._running: tuple[Job, threading.Event] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called from the MQTT worker (agent.handoff): writes the history, never runs a job --
    def submit(self, job: Job) -> JobStatus | None:
        """Queue a job, or reject it at once; a CANCEL is carried out at once.

        Returns the status sent at once (a rejection, or the cancel's outcome), None if queued.
        """
        with self._lock:
            rejection = self._admission_check(job)
            if rejection is None and job.kind is not JobKind.CANCEL:
                unsaved = self._save_state(job, JobState.QUEUED)
                if unsaved is None:
                    self._arrived[job.job_id] = self._clock()
                    self._queue.append(job)
                    self._lock.notify()
                    return None
        if rejection is None and job.kind is not JobKind.CANCEL:
            return self._finish(job, JobState.FAILED, JobReason.DISK_FULL, unsaved)
        if rejection is not None:
            self._emit(rejection)
            return rejection
        return self._carry_out_cancel(job)

    def _save_state(self, job: Job, state: JobState) -> str | None:
        """Persist the job's state; the error's text if it could not be written."""
        try:
            self._history.record(job.job_id, job.expires_at, state)
        except OSError as err:
            log.error("job %s: cannot write its state %s: %s", job.job_id, state.value, err)
            return f"cannot write the job's state on the device: {err}"
        return None

    def _admission_check(self, job: Job) -> JobStatus | None:
        """The REJECTED status this job gets on arrival, or None to queue it."""
        previous = self._history.get(job.job_id)
        return admission_check(
            job,
            runnable=self._handlers,
            now=self._clock(),
            previous_state=previous.state if previous is not None else None,
            base_model_hash=self._base_model_hash,
            queued=len(self._queue),
            max_queued=self._max_queued,
        )

    def knows(self, job_id: str) -> bool:
        """Whether this job id arrived here before (queued, ran, or was rejected)."""
        return self._history.get(job_id) is not None

    def take_offer(self, job: Job) -> bool:
        """Submit the job a desired pointer offers, unless its id arrived before or it expired
        (False: the pointer was re-delivered, or the offer lapsed; reconcile it unanswered)."""
        if self.knows(job.job_id) or job.is_expired(self._clock()):
            return False
        self.submit(job)
        return True

    def reject(self, job_id: str, reason_code: JobReason, message: str) -> None:
        """Reject a job command that could not even be decoded (the transport read its id)."""
        self._emit(
            JobStatus(job_id, JobState.REJECTED, reason_code=reason_code, reason=clip(message))
        )

    def cancel(self, job_id: str) -> CancelResult:
        with self._lock:
            if self._running is not None and self._running[0].job_id == job_id:
                if self._finished(job_id):  # its handler returned a moment ago
                    return CancelResult.NOT_FOUND
                self._running[1].set()
                return CancelResult.CANCELLING_RUNNING
            for job in self._queue:
                if job.job_id == job_id:
                    self._queue.remove(job)
                    self._arrived.pop(job_id, None)
                    break
            else:
                return CancelResult.NOT_FOUND
        self._finish(job, JobState.REJECTED, JobReason.CANCELED, "cancelled before it started")
        return CancelResult.REMOVED_FROM_QUEUE

    def _finished(self, job_id: str) -> bool:
        record = self._history.get(job_id)
        return record is not None and record.state in TERMINAL_STATES

    def _carry_out_cancel(self, job: Job) -> JobStatus:
        assert isinstance(job.params, CancelParams)
        target = job.params.target_job_id
        result = self.cancel(target)
        if result is CancelResult.NOT_FOUND:
            record = self._history.get(target)
            state = "unknown" if record is None else record.state.value
            why = f"no job {target} here" if record is None else f"job {target} ended: {state}"
            return self._finish(
                job,
                JobState.REJECTED,
                JobReason.NOTHING_TO_CANCEL,
                why,
                {"target_job_id": target, "target_state": state},
            )
        # A queued target's REJECTED went out already; a running one's FAILED `canceled`
        # follows when its handler next looks at the flag (between two training batches).
        return self._finish(
            job, JobState.SUCCEEDED, detail={"target_job_id": target, "result": result.value}
        )

    def run_between_jobs(self, task: Callable[[], object]) -> Future:
        """Run `task` on the worker thread before the next queued job; its Future has the result.

        Cancelled (never run) if the runner stops first."""
        future: Future = Future()
        with self._lock:
            if self._stopping:
                future.cancel()
                return future
            self._tasks.append((task, future))
            self._lock.notify()
        return future

    @property
    def busy_job_id(self) -> str | None:
        with self._lock:
            return self._running[0].job_id if self._running else None

    # -- the worker ---------------------------------------------------------------------
    def start(self) -> None:
        self._fail_interrupted()
        self._thread = threading.Thread(target=self._work, name="job-runner", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job and drop the queue (those stay unfinished: failed on restart)."""
        with self._lock:
            self._stopping = True
            if self._running is not None:
                self._running[1].set()
            tasks, self._tasks = list(self._tasks), collections.deque()
            self._lock.notify_all()
        for _, future in tasks:
            future.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def _fail_interrupted(self) -> None:
        for record in self._history.unfinished():
            log.warning("job %s was %s when the agent stopped", record.job_id, record.state)
            self._emit(
                JobStatus(
                    record.job_id,
                    JobState.FAILED,
                    reason_code=JobReason.INTERNAL_ERROR,
                    reason="the agent stopped while the job was queued or running",
                )
            )
            with contextlib.suppress(OSError):  # in memory anyway; tried again next start
                self._history.record(record.job_id, record.expires_at, JobState.FAILED)

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._tasks and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
                task = self._tasks.popleft() if self._tasks else None
                if task is None:
                    job = self._queue.popleft()
                    arrived = self._arrived.pop(job.job_id, self._clock())
                    cancel = threading.Event()
                    self._running = (job, cancel)
            if task is not None:
                _run_task(*task)
                continue
            try:
                self._run_one(job, cancel, arrived)
            except Exception:  # a failing emit must not kill the worker
                log.exception("job %s: could not report its outcome", job.job_id)
            finally:
                with self._lock:
                    self._running = None

    def _run_one(self, job: Job, cancel: threading.Event, arrived: float) -> None:
        if job.is_expired(self._clock()):
            self._finish(job, JobState.REJECTED, JobReason.EXPIRED, "expired while queued")
            return
        unsaved = self._save_state(job, JobState.IN_PROGRESS)
        if unsaved is not None:
            self._finish(job, JobState.FAILED, JobReason.DISK_FULL, unsaved)
            return
        notice = ProgressNotice(job.job_id, self._emit, arrived_at=arrived,
                                after_s=self._in_progress_after,
                                interval_s=self._progress_interval, clock=self._clock)  # fmt: skip
        notice.start()
        context = JobContext(cancel=cancel, progress=notice.progress, ending=notice.end)
        try:
            try:
                outcome = self._handlers[job.kind](job, context)
            finally:
                notice.end()  # before the job's end goes out: no IN_PROGRESS after it
        except JobRejected as err:
            self._finish(job, JobState.REJECTED, err.reason_code, str(err))
        except JobFailed as err:
            self._finish(job, JobState.FAILED, err.reason_code, str(err))
        except Exception as err:
            if isinstance(err, OSError) and err.errno in NO_ROOM:  # e.g. installing the adapter
                self._finish(job, JobState.FAILED, JobReason.DISK_FULL, f"{err}")
            elif cancel.is_set():  # the trainer's Cancelled, or anything the cancel provoked
                why = "the agent is shutting down" if self._stopping else "cancelled while running"
                self._finish(job, JobState.FAILED, JobReason.CANCELED, why)
            else:
                log.exception("job %s (%s) failed", job.job_id, job.kind)
                self._finish(
                    job, JobState.FAILED, JobReason.INTERNAL_ERROR, f"{type(err).__name__}: {err}"
                )
        else:
            self._finish(job, JobState.SUCCEEDED, detail=outcome.detail, sent=outcome.reported)

    def _finish(
        self,
        job: Job,
        state: JobState,
        reason_code: JobReason | None = None,
        reason: str | None = None,
        detail: Mapping[str, Scalar] | None = None,
        sent: bool = False,
    ) -> JobStatus:
        """Records the job's end and sends its status (`sent`: its record said it already)."""
        assert state in TERMINAL_STATES
        self._save_state(job, state)  # unsaved: the outcome still goes out (memory has it)
        status = JobStatus(
            job.job_id,
            state,
            progress=1.0,
            reason=None if reason is None else clip(reason),
            reason_code=reason_code,
            detail=dict(detail or {}),
        )
        if not sent:
            self._emit(status)
        log.info(
            "job %s (%s): %s%s",
            job.job_id,
            job.kind,
            state.value,
            f" ({reason_code.value}: {reason})" if reason_code else "",
        )
        return status


def _run_task(task: Callable[[], object], future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(task())
    except Exception as err:  # the caller decides what a failed task means
        future.set_exception(err)
