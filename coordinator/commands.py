"""What the coordinator asked of a device besides fine-tuning: evaluate or apply an adapter.

Those jobs live in the JobTable like fine-tunes (one life cycle, one /jobs view, one timeout
rule); this table keeps what the JobTable has no columns for: the adapter version, the rollout a
canary evaluation belongs to and which side of the comparison it measures, and its result.
Persisted, so a restarted actor still knows what an arriving status answers.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import StrEnum

from coordinator.state_db import StateDB
from shared.protocol.enums import JobKind


class CanaryRole(StrEnum):
    CANDIDATE = "candidate"  # the new fleet version, evaluated without installing it
    CURRENT = "current"  # what the device runs now


COMMAND_KINDS = frozenset({JobKind.EVALUATE, JobKind.APPLY_ADAPTER})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS command_jobs (
    job_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    adapter_version INTEGER,
    rollout_id TEXT,
    role TEXT,
    accuracy REAL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS command_jobs_by_device ON command_jobs (device_id, kind, created_at);
CREATE INDEX IF NOT EXISTS command_jobs_by_rollout ON command_jobs (rollout_id, device_id);
"""


@dataclass(frozen=True)
class CommandRecord:
    job_id: str
    device_id: str
    kind: JobKind
    adapter_version: int | None
    created_at: float
    rollout_id: str | None = None
    role: CanaryRole | None = None
    accuracy: float | None = None


class CommandLog:
    def __init__(self, db: StateDB) -> None:
        self._db = db
        db.ensure_schema(_SCHEMA)

    def add(self, record: CommandRecord) -> None:
        if record.kind not in COMMAND_KINDS:
            raise ValueError(f"{record.kind} jobs are not commands (fine-tunes live in rounds)")
        if (record.rollout_id is None) != (record.role is None):
            raise ValueError("a canary evaluation needs both its rollout and its role")
        self._db.execute(
            "INSERT INTO command_jobs VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
            (
                record.job_id,
                record.device_id,
                record.kind.value,
                record.adapter_version,
                record.rollout_id,
                None if record.role is None else record.role.value,
                record.created_at,
            ),
        )

    def get(self, job_id: str) -> CommandRecord | None:
        row = self._db.query_one("SELECT * FROM command_jobs WHERE job_id = ?", (job_id,))
        return None if row is None else _from_row(row)

    def record_accuracy(self, job_id: str, accuracy: float) -> None:
        self._db.execute(
            "UPDATE command_jobs SET accuracy = ? WHERE job_id = ?", (float(accuracy), job_id)
        )

    def canary_accuracies(self, rollout_id: str, device_id: str) -> dict[CanaryRole, float | None]:
        """Each role's measured accuracy (None until its evaluation succeeded)."""
        rows = self._db.query(
            "SELECT role, accuracy FROM command_jobs WHERE rollout_id = ? AND device_id = ?",
            (rollout_id, device_id),
        )
        return {CanaryRole(r["role"]): r["accuracy"] for r in rows}

    def last_apply(self, device_id: str, version: int) -> CommandRecord | None:
        row = self._db.query_one(
            "SELECT * FROM command_jobs WHERE device_id = ? AND kind = ? AND adapter_version = ? "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (device_id, JobKind.APPLY_ADAPTER.value, version),
        )
        return None if row is None else _from_row(row)


def _from_row(row: sqlite3.Row) -> CommandRecord:
    return CommandRecord(
        job_id=row["job_id"],
        device_id=row["device_id"],
        kind=JobKind(row["kind"]),
        adapter_version=row["adapter_version"],
        created_at=row["created_at"],
        rollout_id=row["rollout_id"],
        role=None if row["role"] is None else CanaryRole(row["role"]),
        accuracy=row["accuracy"],
    )
