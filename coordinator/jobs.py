"""Fine-tune jobs with the AWS IoT Jobs life cycle, persisted in the state DB.

QUEUED → IN_PROGRESS → SUCCEEDED | FAILED | REJECTED | TIMED_OUT | CANCELED | REMOVED.
Terminal states are final. The device may set only IN_PROGRESS, SUCCEEDED, FAILED, REJECTED; the
coordinator owns the rest, timeouts included. A repeated status (QoS 1 re-delivery) is a no-op.
A retry is a new job (new id, attempt + 1, retry_of = the old id), so the device never sees one id
twice and rejects a stale one; attempts are bounded by max_attempts.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Container, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from coordinator.clock import Clock, system_clock
from coordinator.hot_rows import TransactionalNotes
from coordinator.state_db import StateDB, sql_values


class JobState(StrEnum):
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"
    REMOVED = "REMOVED"


ACTIVE_STATES = frozenset({JobState.QUEUED, JobState.IN_PROGRESS})
TERMINAL_STATES = frozenset(JobState) - ACTIVE_STATES
DEVICE_SETTABLE = frozenset(
    {JobState.IN_PROGRESS, JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED}
)
# A device that rejected a job told us it will not run it; retrying would only be rejected again.
RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.TIMED_OUT})
_NEXT = {
    # QUEUED may end directly: the device's IN_PROGRESS can be lost and the result still arrive.
    JobState.QUEUED: TERMINAL_STATES | {JobState.IN_PROGRESS},
    # Once started, the device can no longer reject it.
    JobState.IN_PROGRESS: TERMINAL_STATES - {JobState.REJECTED},
}


class JobError(ValueError):
    pass


class UnknownJobError(JobError, KeyError):
    pass


@dataclass(frozen=True)
class Job:
    job_id: str
    device_id: str
    state: JobState
    attempt: int
    max_attempts: int
    timeout_s: float
    created_at: float
    updated_at: float
    deadline: float
    kind: str = "finetune"
    trigger: str = "request"  # why it was created: request, round, accuracy_below, drift, ...
    round_id: str | None = None
    retry_of: str | None = None
    detail: str | None = None  # the device's or coordinator's reason for the last state

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def attempts_left(self) -> int:
        return self.max_attempts - self.attempt


_FIELDS = [f.name for f in dataclasses.fields(Job)]
# Reads name the columns in Job's field order: a row becomes a Job by position.
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM jobs"
_STATE = _FIELDS.index("state")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    timeout_s REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    deadline REAL NOT NULL,
    kind TEXT NOT NULL,
    trigger TEXT NOT NULL,
    round_id TEXT,
    retry_of TEXT UNIQUE,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_device ON jobs (device_id, created_at);
DROP INDEX IF EXISTS jobs_by_state;
DROP INDEX IF EXISTS jobs_by_round;
CREATE INDEX IF NOT EXISTS jobs_by_state_deadline ON jobs (state, deadline);
CREATE INDEX IF NOT EXISTS jobs_by_round_state ON jobs (round_id, state);
CREATE INDEX IF NOT EXISTS jobs_retryable ON jobs (updated_at) WHERE {retryable};
"""
# Every tick asks for the overdue active jobs and counts a running round's jobs by state: the
# first is a range of the (state, deadline) index (the overdue ones only, not every active
# job), the second is counted from the (round_id, state) index alone. A tick over 10,000 jobs
# took 3.2-3.8 ms, 1.3-1.7 ms with them (docs/benchmarks.md).
_ACTIVE_SQL = f"state IN ({sql_values(ACTIVE_STATES)})"
# Every tick asks for the failed jobs that may still be retried (ended within a request's
# life): the partial index holds the retryable ones alone, by when they ended, so the read is
# a range of the last hour's, not every failed job held (12-14 ms a tick at 100,000 held).
_RETRYABLE_SQL = f"state IN ({sql_values(RETRYABLE_STATES)}) AND attempt < max_attempts"
_SCHEMA = _SCHEMA.format(retryable=_RETRYABLE_SQL)


class JobTable:
    def __init__(
        self,
        db: StateDB,
        *,
        clock: Clock = system_clock,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        self._db = db
        self._clock = clock
        self._new_id = new_id
        db.ensure_schema(_SCHEMA)
        # The committed jobs counted by state, kept as they change (the metrics snapshot and
        # /health read them every 2 s: counted in SQL, that read every job held, 16 ms at
        # 264,000). A new dict at each commit: readers on other threads never see one mid-way.
        rows = db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        self._by_state: dict[str, int] = {state: n for state, n in rows}
        self._counting = threading.Lock()  # commits on more than one thread
        self._state_changes = TransactionalNotes[tuple[str, int]](db, commit=self._count)

    # ---- creation

    def create(
        self,
        device_id: str,
        *,
        timeout_s: float,
        max_attempts: int = 1,
        round_id: str | None = None,
        trigger: str = "request",
        kind: str = "finetune",
    ) -> Job:
        if timeout_s <= 0:
            raise JobError(f"timeout_s must be > 0, got {timeout_s}")
        if max_attempts < 1:
            raise JobError(f"max_attempts must be >= 1, got {max_attempts}")
        now = self._clock()
        job = Job(
            job_id=self._new_id(),
            device_id=device_id,
            state=JobState.QUEUED,
            attempt=1,
            max_attempts=max_attempts,
            timeout_s=float(timeout_s),
            created_at=now,
            updated_at=now,
            deadline=now + timeout_s,
            kind=kind,
            trigger=trigger,
            round_id=round_id,
        )
        self._insert(job)
        return job

    def retry(self, job_id: str) -> Job:
        """A new attempt of a FAILED / TIMED_OUT job, with a fresh id and deadline."""
        with self._db.transaction():
            job = self.require(job_id)
            reason = self._not_retryable_reason(job)
            if reason:
                raise JobError(f"job {job_id} on {job.device_id} cannot be retried: {reason}")
            now = self._clock()
            attempt = dataclasses.replace(
                job,
                job_id=self._new_id(),
                state=JobState.QUEUED,
                attempt=job.attempt + 1,
                created_at=now,
                updated_at=now,
                deadline=now + job.timeout_s,
                retry_of=job.job_id,
                detail=None,
            )
            self._insert(attempt)
            return attempt

    def can_retry(self, job: Job) -> bool:
        # the common answer (not a retryable state) without building the reason's words: a
        # round's status asks this of every member's job
        if job.state not in RETRYABLE_STATES:
            return False
        return self._not_retryable_reason(job) is None

    # ---- transitions

    def report_status(
        self,
        job_id: str,
        state: JobState | str,
        *,
        device_id: str,
        detail: str | None = None,
        current: Job | None = None,
    ) -> Job:
        """A status from the device that owns the job: IN_PROGRESS, SUCCEEDED, FAILED, REJECTED.
        `current`: the job as the caller read it in this transaction (spares reading it again)."""
        state = JobState(state)
        if state not in DEVICE_SETTABLE:
            raise JobError(f"device {device_id} may not set job {job_id} to {state}")
        job = current if current is not None and current.job_id == job_id else None
        with nullcontext() if self._db.in_transaction else self._db.transaction():
            job = job or self.require(job_id)
            if job.device_id != device_id:
                raise JobError(f"job {job_id} belongs to {job.device_id}, not {device_id}")
            return self._transition_from(job, state, detail)

    def cancel(self, job_id: str, detail: str = "canceled by the coordinator") -> Job:
        return self._transition(job_id, JobState.CANCELED, detail)

    def remove(self, job_id: str, detail: str = "removed by the coordinator") -> Job:
        return self._transition(job_id, JobState.REMOVED, detail)

    def expire_overdue(self) -> list[Job]:
        """Every active job past its deadline becomes TIMED_OUT; returns those."""
        now = self._clock()
        sql = f"SELECT job_id FROM jobs WHERE {_ACTIVE_SQL} AND deadline <= ? ORDER BY deadline"
        overdue = [row["job_id"] for row in self._db.query(sql, (now,))]
        return [
            self._transition(j, JobState.TIMED_OUT, "no result by the deadline") for j in overdue
        ]

    # ---- reads

    def get(self, job_id: str) -> Job | None:
        row = self._db.query_one(f"{_SELECT} WHERE job_id = ?", (job_id,))
        return None if row is None else _from_row(row)

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise UnknownJobError(job_id)
        return job

    def active(self, device_id: str | None = None) -> list[Job]:
        if device_id is None:
            return self._select(f"{_ACTIVE_SQL} ORDER BY created_at")
        return self._select(f"{_ACTIVE_SQL} AND device_id = ? ORDER BY created_at", (device_id,))

    def busy_devices(self) -> set[str]:
        """The devices with an active job, in one query (a pass over many devices reads this
        once instead of each device's active jobs)."""
        rows = self._db.query(f"SELECT DISTINCT device_id FROM jobs WHERE {_ACTIVE_SQL}")
        return {row["device_id"] for row in rows}

    def is_busy(self, device_id: str, busy: Container[str] | None = None) -> bool:
        """The device has an active job: looked up in `busy` (busy_devices, read once for a
        pass over many devices) if given, else read here."""
        return device_id in busy if busy is not None else bool(self.active(device_id))

    def active_count(self) -> int:
        """Committed jobs queued or in progress."""
        counts = self._by_state
        return sum(counts.get(state.value, 0) for state in ACTIVE_STATES)

    def count_by_state(self) -> dict[JobState, int]:
        """Committed jobs held (finished ones for --history-days) by state."""
        return {JobState(state): n for state, n in self._by_state.items() if n}

    def forget(self, states: Iterable[str]) -> None:
        """Jobs in these states (one entry a job) were deleted, in the caller's transaction
        (coordinator.history)."""
        for state in states:
            self._state_changes.note((state, -1))

    def _count(self, changes: list[tuple[str, int]]) -> None:
        with self._counting:
            counts = dict(self._by_state)
            for state, change in changes:
                counts[state] = counts.get(state, 0) + change
            self._by_state = counts

    def recent(self, limit: int = 100, *, device_id: str | None = None) -> list[Job]:
        """The most recently created jobs, newest first (of one device if given)."""
        if device_id is None:
            # newest by rowid (the order they were made): read from the end, not sorted
            return self._select("1 ORDER BY rowid DESC LIMIT ?", (limit,))
        return self._select(
            "device_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?", (device_id, limit)
        )

    def latest_for_device(self, device_id: str, kind: str | None = None) -> Job | None:
        """The device's newest job, or its newest job of one kind (e.g. "finetune")."""
        where: str
        args: tuple[str, ...]
        where, args = "device_id = ?", (device_id,)
        if kind is not None:
            where, args = "device_id = ? AND kind = ?", (device_id, kind)
        jobs = self._select(f"{where} ORDER BY created_at DESC, rowid DESC LIMIT 1", args)
        return jobs[0] if jobs else None

    def for_round(self, round_id: str) -> list[Job]:
        return self._select("round_id = ? ORDER BY created_at, rowid", (round_id,))

    def round_progress(self, round_id: str) -> tuple[int, int]:
        """(active, succeeded) job counts of the round, over all attempts, in one query (counted
        by state from the index: 10,000 jobs 0.68 ms, summing expressions over it 1.45)."""
        rows = self._db.query(
            "SELECT state, count(*) FROM jobs WHERE round_id = ? GROUP BY state", (round_id,)
        )
        counts: dict[str, int] = {state: n for state, n in rows}
        active = sum(counts.get(state.value, 0) for state in ACTIVE_STATES)
        return active, counts.get(JobState.SUCCEEDED.value, 0)

    def latest_attempts(self, round_id: str) -> dict[str, Job]:
        """Each device's most recent attempt in the round."""
        return {job.device_id: job for job in self.for_round(round_id)}

    def retry_candidates(self, *, updated_since: float = float("-inf")) -> list[Job]:
        """FAILED / TIMED_OUT jobs with attempts left, ended after updated_since, that no later
        attempt has replaced yet."""
        rows = self._db.query(
            f"{_SELECT} INDEXED BY jobs_retryable WHERE {_RETRYABLE_SQL} AND updated_at >= ? "
            "AND NOT EXISTS (SELECT 1 FROM jobs later WHERE later.retry_of = jobs.job_id) "
            "ORDER BY updated_at, rowid",
            (updated_since,),
        )
        return [_from_row(r) for r in rows]

    # ---- internals

    def _transition(self, job_id: str, state: JobState, detail: str | None) -> Job:
        # one UPDATE after the checks: no savepoint needed inside the caller's transaction
        with nullcontext() if self._db.in_transaction else self._db.transaction():
            return self._transition_from(self.require(job_id), state, detail)

    def _transition_from(self, job: Job, state: JobState, detail: str | None) -> Job:
        """In the caller's transaction, `job` as read in it."""
        job_id = job.job_id
        if job.state == state:
            return job  # a repeated status: QoS 1 delivers at least once
        if state not in _NEXT.get(job.state, frozenset()):
            raise JobError(
                f"job {job_id} on {job.device_id}: {job.state} -> {state} is not allowed"
                + (" (terminal states are final)" if job.is_terminal else "")
            )
        updated = dataclasses.replace(
            job, state=state, updated_at=self._clock(), detail=detail or job.detail
        )
        self._db.execute(
            "UPDATE jobs SET state = ?, updated_at = ?, detail = ? WHERE job_id = ?",
            (updated.state.value, updated.updated_at, updated.detail, job_id),
        )
        self._state_changes.note((job.state.value, -1))
        self._state_changes.note((state.value, 1))
        return updated

    def _not_retryable_reason(self, job: Job) -> str | None:
        if job.state not in RETRYABLE_STATES:
            return f"state {job.state} is not one of {sorted(RETRYABLE_STATES)}"
        if job.attempt >= job.max_attempts:
            return f"attempt {job.attempt} of {job.max_attempts} was the last"
        if self._db.query_one("SELECT 1 FROM jobs WHERE retry_of = ?", (job.job_id,)):
            return "already retried"
        return None

    def _insert(self, job: Job) -> None:
        values = [getattr(job, f) for f in _FIELDS]
        sql = "INSERT INTO jobs ({}) VALUES ({})".format(
            ", ".join(_FIELDS), ", ".join("?" * len(_FIELDS))
        )
        self._db.execute(sql, values)
        self._state_changes.note((job.state.value, 1))

    def _select(self, where: str, params: tuple[Any, ...] = ()) -> list[Job]:
        return [_from_row(r) for r in self._db.query(f"{_SELECT} WHERE {where}", params)]


def _from_row(row: Any) -> Job:
    """A row of _SELECT (columns in Job's field order)."""
    values = list(row)
    values[_STATE] = _STATES.get(values[_STATE]) or JobState(values[_STATE])  # (raises if unknown)
    return Job(*values)


# A dict look-up, not JobState(...) (1.3 µs): a round's view reads every member's job.
_STATES = {state.value: state for state in JobState}
