"""History older than the coordinator's retention (`--history-days`), deleted a bounded batch
at a time: finished jobs, the command log, fine-tune reports' rows, ended rounds' records and
ended runs.

Without it the state file grows by every round for good (measured: ~1.4 MiB a round at 1,000
devices, docs/benchmarks.md), and so does every read of all jobs held. SQLite reuses the freed
pages: once the retention is full the file grows only by what is kept for good (below); it
does not shrink.

Kept whatever their age: devices, adapter versions and which is current, clusters, rollouts (a
version a canary rolled back is refused a promotion without force, however long ago), anything
of a round or run still going, and each cohort's newest report (the cohort's adapter shape is
read from its reports and must never change).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields

from coordinator.clock import Clock
from coordinator.jobs import ACTIVE_STATES, JobTable
from coordinator.reports import HOLDING_ARRAYS
from coordinator.round_records import ACTIVE_STAGES, RoundStage
from coordinator.rounds import RoundOutcome
from coordinator.runs import RunState
from coordinator.state_db import StateDB, sql_values

# A pass every minute; one that found more than a batch waiting runs again at the next scan.
PRUNE_INTERVAL_S = 60.0
# Rows a table a pass: the deletes run inside the fleet actor's tick, so a pass stays short
# (~30 ms at 10,000 devices: docs/benchmarks.md), and a pass every 5 s still deletes 720,000
# jobs an hour while a backlog waits.
BATCH_ROWS = 1000
# A step of the wall clock ahead of the time that really passed is believed once it has held
# this long (before, the cutoff moves on at the steady clock's pace); drift within the slack,
# and any step back, at once.
STEP_BELIEVED_AFTER_S = 3600.0
CLOCK_SLACK_S = 60.0

_RUNNING_ROUNDS_SQL = f"""
SELECT round_id FROM rounds WHERE outcome = '{RoundOutcome.RUNNING.value}'
UNION SELECT round_id FROM round_records WHERE stage IN ({sql_values(ACTIVE_STAGES)})
UNION SELECT round_id FROM run_rounds WHERE run_id IN
    (SELECT run_id FROM runs WHERE state = '{RunState.RUNNING.value}')
"""
# Ended rounds by when they started, read from the indexes (a round lasts at most its deadline,
# which the retention outlives: coordinator.config).
_ENDED_OUTCOMES = sql_values(set(RoundOutcome) - {RoundOutcome.RUNNING})
_ENDED_ROUNDS_SQL = f"""
SELECT round_id FROM (
    SELECT round_id FROM rounds WHERE outcome IN ({_ENDED_OUTCOMES}) AND started_at < :cutoff
    UNION SELECT round_id FROM round_records
        WHERE stage IN ({sql_values(set(RoundStage) - ACTIVE_STAGES)}) AND started_at < :cutoff
) WHERE round_id NOT IN ({_RUNNING_ROUNDS_SQL})
LIMIT :limit
"""
_ENDED_RUNS_SQL = f"""
SELECT run_id FROM runs
    WHERE state IN ({sql_values(set(RunState) - {RunState.RUNNING})}) AND started_at < :cutoff
LIMIT :limit
"""


@dataclass(frozen=True)
class Pruned:
    """Rows one pass deleted, by what they were."""

    jobs: int = 0
    commands: int = 0
    reports: int = 0
    rounds: int = 0
    runs: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def as_text(self) -> str:
        return ", ".join(f"{getattr(self, f.name)} {f.name}" for f in fields(self))


class _OldestFirst:
    """One table's rows read in insertion order (rowid) from where the last pass stopped, up to
    the first row not yet old: their time column grows with the rowid, so the old ones are a
    prefix of the table and no index on their age is needed (one would cost every insert)."""

    def __init__(self, db: StateDB, table: str, age: str, columns: str) -> None:
        self._db = db
        after = f"FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT"
        self._first = f"SELECT {age} {after} 1"
        self._sql = f"SELECT rowid, {age}, {columns} {after} ?"
        self._delete = f"DELETE FROM {table} WHERE rowid = ?"
        self._after = 0  # rowid: the rows before it were kept by the last pass (still needed)
        self.waiting = False  # the last pass stopped at its batch's end, not at a young row

    def prune(
        self,
        cutoff: float,
        now: float,
        limit: int,
        may_go: Callable[[sqlite3.Row], bool],
        gone: Callable[[list[sqlite3.Row]], None] = lambda rows: None,
    ) -> int:
        """Deletes the rows read whose `age` column is before `cutoff` and that `may_go` (each
        row as (rowid, age, *columns)); returns how many. A row dated after `now` (written
        while the clock was ahead) is kept and walked past, so it holds back none behind it."""
        first = self._db.query_one(self._first, (self._after,))
        if first is None or cutoff <= first[0] <= now:  # the usual pass: one row, none old
            self.waiting, self._after = False, 0
            return 0
        rows = self._db.query(self._sql, (self._after, limit))
        doomed: list[sqlite3.Row] = []
        young = False
        for row in rows:
            if row[1] > now:
                continue
            if row[1] >= cutoff:
                young = True
                break
            if may_go(row):
                doomed.append(row)
        self.waiting = not young and len(rows) == limit
        # A full batch of old rows goes on from its last row next time; anything else starts
        # again from the beginning (the rows kept may be free to go by then).
        self._after = rows[-1][0] if self.waiting else 0
        if doomed:
            self._db.executemany(self._delete, [(row[0],) for row in doomed])
            gone(doomed)
        return len(doomed)


class HistoryPruner:
    """Deletes what is older than `keep_s`: a pass at most every PRUNE_INTERVAL_S (sooner while
    more than a batch waits), in the caller's transaction. One caller thread at a time."""

    def __init__(
        self,
        db: StateDB,
        jobs: JobTable,
        keep_s: float,
        clock: Clock,
        *,
        steady: Clock = time.monotonic,  # coordinator.fleet passes one that counts suspend
        batch_rows: int = BATCH_ROWS,
    ) -> None:
        if not keep_s > 0 or batch_rows < 1:
            raise ValueError(f"history kept {keep_s} s, {batch_rows} rows a pass: both must be > 0")
        self._db = db
        self._job_table = jobs  # counts its jobs by state: told of those deleted
        self._keep_s = keep_s
        self._clock = clock
        self._steady = steady  # time as it really passes (not set ahead or back)
        self._offset: float | None = None  # the wall clock less the steady one, as believed
        self._ahead_since: float | None = None  # steady time the wall clock stepped ahead at
        self._batch = batch_rows
        self._next_at = float("-inf")
        self._jobs = _OldestFirst(db, "jobs", "created_at", "state, round_id")
        job_state = "(SELECT state FROM jobs j WHERE j.job_id = command_jobs.job_id)"
        self._commands = _OldestFirst(db, "command_jobs", "created_at", job_state)
        self._reports = _OldestFirst(
            db, "fit_reports", "received_at", f"round_id, cohort, {HOLDING_ARRAYS}"
        )
        self._more_rounds = self._more_runs = False

    def prune_if_due(self) -> Pruned | None:
        """A pass if one is due (None if not)."""
        now = self._clock()
        if now < self._next_at - PRUNE_INTERVAL_S:  # the clock was set back: due again
            self._next_at = now
        if now < self._next_at:
            return None
        pruned = self.prune(self._cutoff(now))
        waiting = (self._jobs, self._commands, self._reports)
        backlog = self._more_rounds or self._more_runs or any(t.waiting for t in waiting)
        self._next_at = now if backlog else now + PRUNE_INTERVAL_S
        return pruned

    def _cutoff(self, now: float) -> float:
        """`now` less the retention, with `now` as the wall clock was believed: a step ahead
        (a clock mis-set, NTP correcting a host that booted with none) is believed only once it
        has held for STEP_BELIEVED_AFTER_S of steady time, so a clock set ahead for a while
        does not age what was written an hour ago, and a lasting correction is caught up with.
        A step back, or drift within CLOCK_SLACK_S, is believed at once."""
        steady = self._steady()
        offset = now - steady  # the wall clock against the steady one
        believed = self._offset
        if believed is None or offset - believed <= CLOCK_SLACK_S:
            self._offset, self._ahead_since = offset, None
        elif self._ahead_since is None:
            self._ahead_since = steady
        elif steady - self._ahead_since >= STEP_BELIEVED_AFTER_S:
            self._offset, self._ahead_since = offset, None
        assert self._offset is not None
        return min(now, steady + self._offset) - self._keep_s

    def prune(self, cutoff: float) -> Pruned:
        """One pass: a batch at most of each kind of row older than `cutoff` (unix seconds)."""
        now = self._clock()
        running = {r[0] for r in self._db.query(_RUNNING_ROUNDS_SQL)}
        return Pruned(
            jobs=self._prune_jobs(cutoff, now, running),
            commands=self._commands.prune(
                cutoff, now, self._batch, lambda r: r[2] not in ACTIVE_STATES
            ),
            reports=self._prune_reports(cutoff, now, running),
            rounds=self._prune_rounds(cutoff),
            runs=self._prune_runs(cutoff),
        )

    def _prune_jobs(self, cutoff: float, now: float, running: Collection[str]) -> int:
        def may_go(row: sqlite3.Row) -> bool:
            return row[2] not in ACTIVE_STATES and row[3] not in running

        def gone(rows: list[sqlite3.Row]) -> None:
            self._job_table.forget(row[2] for row in rows)

        return self._jobs.prune(cutoff, now, self._batch, may_go, gone)

    def _prune_reports(self, cutoff: float, now: float, running: Collection[str]) -> int:
        newest: dict[str, int] = {}  # cohort -> its newest report's rowid, kept

        def may_go(row: sqlite3.Row) -> bool:
            rowid, _, round_id, cohort, held_in_row = row
            if round_id in running or held_in_row:  # an earlier version's arrays go first
                return False
            if cohort not in newest:
                newest[cohort] = self._newest_report(cohort)
            return bool(rowid != newest[cohort])

        return self._reports.prune(cutoff, now, self._batch, may_go)

    def _newest_report(self, cohort: str) -> int:
        row = self._db.query_one(
            "SELECT rowid FROM fit_reports WHERE cohort = ? ORDER BY received_at DESC, rowid DESC "
            "LIMIT 1",
            (cohort,),
        )
        return -1 if row is None else int(row[0])

    def _prune_rounds(self, cutoff: float) -> int:
        deleted, self._more_rounds = self._delete_ended(
            _ENDED_ROUNDS_SQL, cutoff, "round_id", ("rounds", "round_records", "run_rounds")
        )
        return deleted

    def _prune_runs(self, cutoff: float) -> int:
        deleted, self._more_runs = self._delete_ended(
            _ENDED_RUNS_SQL, cutoff, "run_id", ("runs", "run_rounds")
        )
        return deleted

    def _delete_ended(
        self, found_by: str, cutoff: float, key: str, tables: tuple[str, ...]
    ) -> tuple[int, bool]:
        """Deletes a batch of the ids `found_by` finds (ended before `cutoff`) from each table
        by `key`; returns how many, and whether the batch was full (more may wait)."""
        found = self._db.query(found_by, {"cutoff": cutoff, "limit": self._batch})
        ended = [(r[0],) for r in found]
        for table in tables:
            self._db.executemany(f"DELETE FROM {table} WHERE {key} = ?", ended)
        return len(ended), len(found) == self._batch
