"""A round's record from trigger to stored adapter: what the RoundTable (membership, deadline,
outcome) does not hold. Which cohort and why, who was skipped at the start, who failed and why,
the aggregation (algorithm, weights, the exact-vs-naive gap), the version it produced, its rollout.

The stage also makes the pipeline restartable: a round closed but not yet aggregated when the
actor died is AGGREGATING, and is aggregated again on start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from coordinator.state_db import StateDB


class RoundStage(StrEnum):
    RUNNING = "RUNNING"  # jobs out, waiting for reports
    AGGREGATING = "AGGREGATING"  # closed with enough answers, aggregation under way
    STORED = "STORED"  # aggregated into new adapter versions (one per cluster that went on)
    DONE = "DONE"  # closed; its reports measured the aggregate before, no cluster went on
    FAILED = "FAILED"  # too few answers, or nothing aggregatable


ACTIVE_STAGES = frozenset({RoundStage.RUNNING, RoundStage.AGGREGATING})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS round_records (
    round_id TEXT PRIMARY KEY,
    cohort TEXT NOT NULL,
    trigger TEXT NOT NULL,
    stage TEXT NOT NULL,
    started_at REAL NOT NULL,
    skipped_at_start TEXT NOT NULL,
    closed_at REAL,
    answered TEXT,
    failures TEXT,
    algorithm TEXT,
    adapter_version INTEGER,
    weights TEXT,
    gap TEXT,
    error TEXT,
    finished_at REAL,
    rollout_id TEXT,
    rollout_note TEXT
);
CREATE INDEX IF NOT EXISTS round_records_by_stage ON round_records (stage, cohort);
CREATE INDEX IF NOT EXISTS round_records_by_start ON round_records (stage, started_at);
"""
_JSON_FIELDS = ("skipped_at_start", "answered", "failures", "weights", "gap", "outcomes")


@dataclass(frozen=True)
class RoundRecord:
    round_id: str
    cohort: str
    trigger: str
    stage: RoundStage
    started_at: float
    skipped_at_start: Mapping[str, str] = field(default_factory=dict)
    closed_at: float | None = None
    answered: Sequence[str] | None = None
    failures: Mapping[str, str] | None = None  # device -> why it is not in the aggregate
    algorithm: str | None = None
    adapter_version: int | None = None
    weights: Mapping[str, float] | None = None
    gap: Mapping[str, Any] | None = None  # exact vs naive FedAvg (coordinator.aggregation)
    error: str | None = None
    finished_at: float | None = None
    rollout_id: str | None = None
    rollout_note: str | None = None
    # per cluster: the federation's decision after this round, the version it stored, errors
    outcomes: Mapping[str, Mapping[str, Any]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


class RoundRecords:
    def __init__(self, db: StateDB) -> None:
        self._db = db
        db.ensure_schema(_SCHEMA)
        db.add_missing_columns("round_records", {"outcomes": "TEXT"})

    def open(
        self,
        round_id: str,
        *,
        cohort: str,
        trigger: str,
        started_at: float,
        skipped: Mapping[str, str],
    ) -> None:
        self._db.execute(
            "INSERT INTO round_records (round_id, cohort, trigger, stage, started_at, "
            "skipped_at_start) VALUES (?, ?, ?, ?, ?, ?)",
            (round_id, cohort, trigger, RoundStage.RUNNING.value, started_at, _dump(skipped)),
        )

    def closed(
        self,
        round_id: str,
        *,
        completed: bool,
        answered: Sequence[str],
        failures: Mapping[str, str],
        at: float,
    ) -> None:
        stage = RoundStage.AGGREGATING if completed else RoundStage.FAILED
        self._update(
            round_id,
            stage=stage.value,
            closed_at=at,
            answered=_dump(list(answered)),
            failures=_dump(dict(failures)),
            error=None if completed else "too few devices answered",
            finished_at=None if completed else at,
        )

    def stored(
        self,
        round_id: str,
        *,
        algorithm: str,
        version: int,
        weights: Mapping[str, float],
        failures: Mapping[str, str],
        gap: Mapping[str, Any],
        at: float,
    ) -> None:
        """A cluster's aggregate of this round was stored (the round may have several)."""
        with self._db.transaction():
            record = self.get(round_id)
            known = dict(record.failures or {}) if record is not None else {}
            self._update(
                round_id,
                algorithm=algorithm,
                adapter_version=version,
                weights=_dump({**dict(record.weights or {}), **weights} if record else weights),
                failures=_dump({**known, **failures}),
                gap=_dump(dict(gap)),
                finished_at=at,
            )

    def cluster_outcome(self, round_id: str, cluster: str, outcome: Mapping[str, Any]) -> None:
        """Merges what happened to one cluster in this round into the record."""
        with self._db.transaction():
            record = self.get(round_id)
            if record is None:
                raise KeyError(f"no record of round {round_id}")
            outcomes = {k: dict(v) for k, v in (record.outcomes or {}).items()}
            outcomes.setdefault(cluster, {}).update(outcome)
            self._update(round_id, outcomes=_dump(outcomes))

    def settle(self, round_id: str, stage: RoundStage, at: float) -> None:
        """The round's last step is done: STORED, DONE (or FAILED)."""
        self._update(round_id, stage=stage.value, finished_at=at)

    def aggregation_failed(self, round_id: str, error: str, at: float) -> None:
        self._update(round_id, stage=RoundStage.FAILED.value, error=error, finished_at=at)

    def rollout(self, round_id: str, *, rollout_id: str | None, note: str) -> None:
        self._update(round_id, rollout_id=rollout_id, rollout_note=note)

    def get(self, round_id: str) -> RoundRecord | None:
        row = self._db.query_one("SELECT * FROM round_records WHERE round_id = ?", (round_id,))
        return None if row is None else _from_row(row)

    def in_stage(self, stage: RoundStage) -> list[RoundRecord]:
        rows = self._db.query(
            "SELECT * FROM round_records WHERE stage = ? ORDER BY started_at", (stage.value,)
        )
        return [_from_row(r) for r in rows]

    def active_for_cohort(self, cohort: str) -> RoundRecord | None:
        row = self._db.query_one(
            "SELECT * FROM round_records WHERE cohort = ? AND stage IN (?, ?) LIMIT 1",
            (cohort, *(s.value for s in sorted(ACTIVE_STAGES))),
        )
        return None if row is None else _from_row(row)

    def recent(self, limit: int = 50) -> list[RoundRecord]:
        # newest by rowid (the order they started): read from the end, not sorted
        rows = self._db.query("SELECT * FROM round_records ORDER BY rowid DESC LIMIT ?", (limit,))
        return [_from_row(r) for r in rows]

    def _update(self, round_id: str, **values: Any) -> None:
        assignments = ", ".join(f"{name} = ?" for name in values)
        updated = self._db.execute(
            f"UPDATE round_records SET {assignments} WHERE round_id = ?",
            (*values.values(), round_id),
        )
        if updated == 0:
            raise KeyError(f"no record of round {round_id}")


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=True)


def _from_row(row: Any) -> RoundRecord:
    values = {name: row[name] for name in row.keys()}  # noqa: SIM118 (sqlite3.Row)
    for name in _JSON_FIELDS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    values["stage"] = RoundStage(values["stage"])
    return RoundRecord(**values)
