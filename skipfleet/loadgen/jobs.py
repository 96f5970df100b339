"""Jobs on a simulated device: the agent's job life cycle (agent.jobs), on one event loop.

The same rules as the agent (docs/agent.md, "Jobs"): checks on arrival answered REJECTED
(expired, duplicate id, another base model, queue full); at most `max_queued` wait; one runs at
a time, then SUCCEEDED, FAILED or REJECTED (a fine-tune's report is its SUCCEEDED); IN_PROGRESS
only for a job unfinished IN_PROGRESS_AFTER_S after it arrived (agent/job_progress.py), then its
progress at most every PROGRESS_INTERVAL_S; a CANCEL is carried out on arrival and never
queued; a desired pointer's offer is taken as its APPLY_ADAPTER job unless seen or expired.
Nothing blocks: a handler may end its job later (a timer, an adapter to wait for) through the
RunningJob it is given. Tasks given to `between_jobs` (the desired-state installs) run before
the next job starts, never during one.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.admission import admission_check
from agent.jobs import CancelResult, clip
from shared.protocol.checks import Scalar
from shared.protocol.enums import TERMINAL_STATES, JobKind, JobReason, JobState
from shared.protocol.messages import CancelParams, Job, JobStatus
from skipfleet.loadgen.timing import Timers

log = logging.getLogger(__name__)

# The agent's defaults (--in-progress-after-seconds, JobRunner's progress interval)
IN_PROGRESS_AFTER_S = 5.0
PROGRESS_INTERVAL_S = 5.0


@dataclass(eq=False)
class RunningJob:
    """The job a handler works on; exactly one of succeed / fail / reject ends it."""

    job: Job
    runner: SimJobRunner
    cancelled: bool = False
    finished: bool = False
    cancel_hooks: list[Callable[[], None]] = field(default_factory=list)
    end_hooks: list[Callable[[], None]] = field(default_factory=list)
    in_progress_due: float = 0.0  # loop time from which IN_PROGRESS may go out
    in_progress_sent: float | None = None  # loop time of the last one
    fraction: float = 0.0
    ends_by: float | None = None  # loop time its handler's own timer ends it, at the latest

    def on_cancel(self, hook: Callable[[], None]) -> None:
        """Runs (on the next loop turn) if a CANCEL job targets this one while it runs."""
        self.cancel_hooks.append(hook)

    def on_end(self, hook: Callable[[], None]) -> None:
        """Runs when the job ends, however it ends (stop its timers here)."""
        self.end_hooks.append(hook)

    def progress(self, fraction: float) -> None:
        """The fraction done: an IN_PROGRESS if due and the last is an interval old."""
        self.fraction = min(1.0, max(0.0, fraction))
        self.runner.say_in_progress(self, throttle=True)

    def succeed(self, detail: Mapping[str, Scalar] | None = None, reported: bool = False) -> None:
        """`reported`: the handler's report went out, and says SUCCEEDED itself."""
        self.runner.end(self, JobState.SUCCEEDED, detail=detail, sent=reported)

    def fail(self, code: JobReason, reason: str) -> None:
        self.runner.end(self, JobState.FAILED, code, reason)

    def reject(self, code: JobReason, reason: str) -> None:
        self.runner.end(self, JobState.REJECTED, code, reason)


Handler = Callable[[RunningJob], None]


class SimJobRunner:
    def __init__(
        self,
        handlers: Mapping[JobKind, Handler],
        emit: Callable[[JobStatus], None],
        timers: Timers,
        *,
        base_model_hash: str,
        max_queued: int = 4,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._handlers = dict(handlers)
        self._emit = emit
        self._timers = timers
        self._base_model_hash = base_model_hash
        self._max_queued = max_queued
        self._wall = wall
        self.history: dict[str, JobState] = {}  # job id -> last state (the agent's JobHistory)
        self._arrived: dict[str, float] = {}  # queued job id -> loop time it arrived
        self._queue: collections.deque[Job] = collections.deque()
        self._tasks: collections.deque[Callable[[], None]] = collections.deque()
        self.running: RunningJob | None = None

    @property
    def busy_job_id(self) -> str | None:
        return self.running.job.job_id if self.running else None

    # ---- arrivals

    def submit(self, job: Job) -> None:
        rejection = self._admission_check(job)
        if rejection is not None:
            self._emit(rejection)
        elif job.kind is JobKind.CANCEL:
            self._carry_out_cancel(job)
        else:
            self.history[job.job_id] = JobState.QUEUED
            self._arrived[job.job_id] = self._timers.time()
            self._queue.append(job)
            self._next()

    def take_offer(self, job: Job) -> bool:
        """A desired pointer's APPLY_ADAPTER job, submitted unless seen before or expired."""
        if job.job_id in self.history or job.is_expired(self._wall()):
            return False
        self.submit(job)
        return True

    def reject(self, job_id: str, code: JobReason, message: str) -> None:
        """A job command that could not be decoded, but whose id could be read."""
        self._emit(JobStatus(job_id, JobState.REJECTED, reason_code=code, reason=clip(message)))

    def between_jobs(self, task: Callable[[], None]) -> None:
        self._tasks.append(task)
        self._next()

    # ---- the life cycle

    def end(
        self,
        run: RunningJob,
        state: JobState,
        code: JobReason | None = None,
        reason: str | None = None,
        detail: Mapping[str, Scalar] | None = None,
        sent: bool = False,
    ) -> None:
        if run.finished:
            return  # a late timer after a cancel already ended it
        run.finished = True
        for hook in run.end_hooks:
            hook()
        self._finish(run.job, state, code, reason, detail, sent=sent)
        if self.running is run:
            self.running = None
        self._next()

    def _admission_check(self, job: Job) -> JobStatus | None:
        return admission_check(
            job,
            runnable=self._handlers,
            now=self._wall(),
            previous_state=self.history.get(job.job_id),
            base_model_hash=self._base_model_hash,
            queued=len(self._queue),
            max_queued=self._max_queued,
        )

    def _next(self) -> None:
        while self.running is None:
            if self._tasks:
                self._tasks.popleft()()
                continue
            if not self._queue:
                return
            job = self._queue.popleft()
            arrived = self._arrived.pop(job.job_id, self._timers.time())
            if job.is_expired(self._wall()):
                self._finish(job, JobState.REJECTED, JobReason.EXPIRED, "expired while queued")
                continue
            self._start(job, arrived)

    def say_in_progress(self, run: RunningJob, *, throttle: bool = False) -> None:
        """IN_PROGRESS, if the job runs still and is due (`throttle`: an interval after the
        last; without it, only the first: the timer's)."""
        now = self._timers.time()
        if run.finished or now < run.in_progress_due:
            return
        last = run.in_progress_sent
        if last is not None and (not throttle or now - last < PROGRESS_INTERVAL_S):
            return
        run.in_progress_sent = now
        self._emit(JobStatus(run.job.job_id, JobState.IN_PROGRESS, progress=run.fraction))

    def _start(self, job: Job, arrived: float) -> None:
        run = RunningJob(job, self, in_progress_due=arrived + IN_PROGRESS_AFTER_S)
        self.running = run
        self.history[job.job_id] = JobState.IN_PROGRESS
        if run.in_progress_due <= self._timers.time():  # it waited that long behind another job
            self.say_in_progress(run)
        try:
            self._handlers[job.kind](run)
        except Exception as err:  # a bug in a handler fails its job, as in the agent
            log.exception("job %s (%s) failed", job.job_id, job.kind)
            self.end(run, JobState.FAILED, JobReason.INTERNAL_ERROR, f"{type(err).__name__}: {err}")
        self._remind_in_progress(run)

    def _remind_in_progress(self, run: RunningJob) -> None:
        """The IN_PROGRESS timer, at the loop time it is due, for a job still running after
        its handler returned, unless it is sure to have ended by then. Most jobs end inside
        their handler, and a timer made only to be cancelled cost as much as the status."""
        delay = run.in_progress_due - self._timers.time()
        if run.finished or delay <= 0 or run.in_progress_sent is not None:
            return
        if run.ends_by is not None and run.ends_by < run.in_progress_due:
            return  # its own timer ends it first (a cancel ends it sooner still)
        timer = self._timers.call_later(delay, lambda: self.say_in_progress(run))
        run.on_end(timer.cancel)

    def _finish(
        self,
        job: Job,
        state: JobState,
        code: JobReason | None = None,
        reason: str | None = None,
        detail: Mapping[str, Scalar] | None = None,
        sent: bool = False,
    ) -> JobStatus:
        assert state in TERMINAL_STATES
        self.history[job.job_id] = state
        self._arrived.pop(job.job_id, None)
        status = JobStatus(
            job.job_id,
            state,
            progress=1.0,
            reason=None if reason is None else clip(reason),
            reason_code=code,
            detail=dict(detail or {}),
        )
        if not sent:
            self._emit(status)
        return status

    # ---- cancel

    def _cancel(self, target: str) -> CancelResult:
        run = self.running
        if run is not None and run.job.job_id == target and not run.finished:
            run.cancelled = True
            # The agent's trainer notices between two batches: the target's FAILED comes after
            # the cancel job's own SUCCEEDED, so the hooks run on the next loop turn.
            for hook in run.cancel_hooks:
                self._timers.call_later(0, hook)
            return CancelResult.CANCELLING_RUNNING
        queued = next((j for j in self._queue if j.job_id == target), None)
        if queued is None:
            return CancelResult.NOT_FOUND
        self._queue.remove(queued)
        self._finish(queued, JobState.REJECTED, JobReason.CANCELED, "cancelled before it started")
        return CancelResult.REMOVED_FROM_QUEUE

    def _carry_out_cancel(self, job: Job) -> None:
        assert isinstance(job.params, CancelParams)
        target = job.params.target_job_id
        result = self._cancel(target)
        if result is CancelResult.NOT_FOUND:
            previous = self.history.get(target)
            state = "unknown" if previous is None else previous.value
            why = f"no job {target} here" if previous is None else f"job {target} ended: {state}"
            detail = {"target_job_id": target, "target_state": state}
            self._finish(job, JobState.REJECTED, JobReason.NOTHING_TO_CANCEL, why, detail)
            return
        self._finish(
            job, JobState.SUCCEEDED, detail={"target_job_id": target, "result": result.value}
        )
