"""A fine-tune round: a set of devices asked to fine-tune, and when it is over.

A round completes when at least min_completion_ratio of its devices answered (job SUCCEEDED) and
either every device has settled or the deadline passed. It fails as soon as the ratio can no longer
be reached, or at the deadline; it never waits forever for a dead device. Its state is derived
from the job table (each device's latest attempt), so it needs no bookkeeping of its own beyond
its definition and whether it was closed.
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from coordinator.jobs import Job, JobState
from coordinator.state_db import StateDB


class RoundOutcome(StrEnum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Round:
    round_id: str
    device_ids: tuple[str, ...]
    started_at: float
    deadline: float
    min_completion_ratio: float
    cohort: str | None = None
    # Devices whose report the coordinator refused: failed for themselves, not for the round
    # (they leave the completion ratio's denominator, and get no retry in it).
    excused: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.device_ids:
            raise ValueError(f"round {self.round_id} has no devices")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError(f"round {self.round_id} lists a device twice")
        if not 0.0 < self.min_completion_ratio <= 1.0:
            raise ValueError(
                f"min_completion_ratio must be in (0, 1], got {self.min_completion_ratio}"
            )
        if self.deadline <= self.started_at:
            raise ValueError(f"round {self.round_id}: deadline must be after the start")

    @property
    def answers_needed(self) -> int:
        # Counted in devices, not compared as floats: 0.7 * 10 is 7.000000000000001.
        counted = len(self.device_ids)
        if self.excused:  # (a set of a thousand ids on every tick's check, otherwise)
            counted -= len(set(self.excused) & set(self.device_ids))
        return math.ceil(self.min_completion_ratio * counted - 1e-9)


@dataclass(frozen=True)
class RoundStatus:
    round_id: str
    outcome: RoundOutcome
    answered: tuple[str, ...]
    failed: Mapping[str, str]  # device -> why it did not answer
    pending: tuple[str, ...]
    completion_ratio: float

    @property
    def is_over(self) -> bool:
        return self.outcome is not RoundOutcome.RUNNING


def evaluate_round(
    rnd: Round,
    latest_jobs: Mapping[str, Job],
    now: float,
    *,
    can_retry: Mapping[str, bool] | None = None,
    not_started_reasons: Mapping[str, str] | None = None,
) -> RoundStatus:
    """Pure: the round's status from each device's latest job attempt at time now.

    can_retry[device] says whether a failed latest attempt will get another one (then the device
    is still pending); not_started_reasons explains devices that never got a job (e.g. offline).
    """
    can_retry = can_retry or {}
    not_started_reasons = not_started_reasons or {}
    answered, pending, failed = [], [], {}
    for device in rnd.device_ids:
        job = latest_jobs.get(device)
        if device in rnd.excused:
            failed[device] = "its report was refused" + (f" ({job.detail})" if job else "")
        elif job is not None and job.state is JobState.SUCCEEDED:
            answered.append(device)
        elif job is not None and job.is_terminal and not can_retry.get(device, False):
            failed[device] = f"{job.state}" + (f": {job.detail}" if job.detail else "")
        else:
            pending.append(device)
    needed = rnd.answers_needed
    reachable = len(answered) + len(pending) >= needed
    deadline_passed = now >= rnd.deadline
    if deadline_passed or not pending or not reachable:
        why = "no answer by the deadline" if deadline_passed else "round ended before it answered"
        for device in pending:
            job = latest_jobs.get(device)
            failed[device] = _why_pending(job, why, not_started_reasons.get(device))
        outcome = RoundOutcome.COMPLETED if len(answered) >= needed else RoundOutcome.FAILED
        pending = []
    else:
        outcome = RoundOutcome.RUNNING
    ratio = len(answered) / len(rnd.device_ids)
    return RoundStatus(rnd.round_id, outcome, tuple(answered), failed, tuple(pending), ratio)


def _why_pending(job: Job | None, why: str, not_started_reason: str | None) -> str:
    if job is None:
        return "never started" + (f" ({not_started_reason})" if not_started_reason else "")
    return f"{why} (last state {job.state})"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    round_id TEXT PRIMARY KEY,
    device_ids TEXT NOT NULL,
    started_at REAL NOT NULL,
    deadline REAL NOT NULL,
    min_completion_ratio REAL NOT NULL,
    cohort TEXT,
    outcome TEXT NOT NULL,
    closed_at REAL
);
CREATE INDEX IF NOT EXISTS rounds_by_outcome ON rounds (outcome, started_at);
"""
# Every tick counts the open rounds (twice); without the index each count read every round's
# row, its device list (~130 KB at 10,000 devices) included, so a tick's cost grew with the
# rounds kept (docs/benchmarks.md).
_ADDED_COLUMNS = {"excused": "TEXT"}


class RoundTable:
    """Round definitions and whether each was closed, in the state DB."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        db.ensure_schema(_SCHEMA)
        db.add_missing_columns("rounds", _ADDED_COLUMNS)

    def excuse(self, round_id: str, device_id: str) -> None:
        """The device's report was refused: see Round.excused."""
        with self._db.transaction():
            rnd = self.get(round_id)
            if rnd is None or device_id in rnd.excused:
                return
            excused = json.dumps([*rnd.excused, device_id])
            self._db.execute(
                "UPDATE rounds SET excused = ? WHERE round_id = ?", (excused, round_id)
            )

    def add(self, rnd: Round) -> None:
        self._db.execute(
            "INSERT INTO rounds (round_id, device_ids, started_at, deadline, "
            "min_completion_ratio, cohort, outcome) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rnd.round_id,
                json.dumps(list(rnd.device_ids)),
                rnd.started_at,
                rnd.deadline,
                rnd.min_completion_ratio,
                rnd.cohort,
                RoundOutcome.RUNNING.value,
            ),
        )

    def get(self, round_id: str) -> Round | None:
        row = self._db.query_one("SELECT * FROM rounds WHERE round_id = ?", (round_id,))
        return None if row is None else _round_from_row(row)

    def outcome(self, round_id: str) -> RoundOutcome | None:
        row = self._db.query_one("SELECT outcome FROM rounds WHERE round_id = ?", (round_id,))
        return None if row is None else RoundOutcome(row["outcome"])

    def open_rounds(self) -> list[Round]:
        rows = self._db.query(
            "SELECT * FROM rounds WHERE outcome = ? ORDER BY started_at", ("RUNNING",)
        )
        return [_round_from_row(r) for r in rows]

    def open_count(self) -> int:
        (row,) = self._db.query(  # COUNT(*): always one row
            "SELECT COUNT(*) AS n FROM rounds WHERE outcome = ?", (RoundOutcome.RUNNING.value,)
        )
        return int(row["n"])

    def close(self, round_id: str, outcome: RoundOutcome, at: float) -> None:
        self._db.execute(
            "UPDATE rounds SET outcome = ?, closed_at = ? WHERE round_id = ? AND outcome = ?",
            (outcome.value, at, round_id, RoundOutcome.RUNNING.value),
        )


def _round_from_row(row: sqlite3.Row) -> Round:
    return _parsed_round(tuple(row[name] for name in _ROUND_COLUMNS))


_ROUND_COLUMNS = (
    "round_id", "device_ids", "started_at", "deadline", "min_completion_ratio", "cohort",
    "excused",
)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _parsed_round(values: tuple[Any, ...]) -> Round:
    """A row's Round, parsed once for the same row values: every tick reads the open rounds,
    and decoding a thousand device ids (and checking them) each time was most of an idle
    tick. Rounds are immutable; a changed row (an excused device) is other values."""
    round_id, device_ids, started_at, deadline, ratio, cohort, excused = values
    return Round(
        round_id=round_id,
        device_ids=tuple(json.loads(device_ids)),
        started_at=started_at,
        deadline=deadline,
        min_completion_ratio=ratio,
        cohort=cohort,
        excused=tuple(json.loads(excused or "[]")),
    )
