"""Fine-tune requests waiting for a free slot or for their device to become eligible.

Operator requests and round memberships are durable (a restart must not forget that a device was
asked to fine-tune); automatic triggers are not queued, they are re-evaluated on every tick.
One pending request per (device, round); round "" means a request outside any round.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.state_db import StateDB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS finetune_requests (
    device_id TEXT NOT NULL,
    round_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    requested_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (device_id, round_id)
);
"""


@dataclass(frozen=True)
class PendingRequest:
    device_id: str
    trigger: str
    requested_at: float
    expires_at: float
    round_id: str | None = None


class RequestQueue:
    def __init__(self, db: StateDB) -> None:
        self._db = db
        db.ensure_schema(_SCHEMA)

    def add(self, request: PendingRequest) -> None:
        self.add_many([request])

    def add_many(self, requests: Iterable[PendingRequest]) -> None:
        """One statement for all of them (a round queues every member at once). A repeated
        request keeps its place in the queue (and its first requested_at)."""
        self._db.executemany(
            "INSERT INTO finetune_requests VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(device_id, round_id) DO UPDATE SET expires_at = excluded.expires_at",
            [
                (r.device_id, r.round_id or "", r.trigger, r.requested_at, r.expires_at)
                for r in requests
            ],
        )

    def pending(self) -> list[PendingRequest]:
        rows = self._db.query("SELECT * FROM finetune_requests ORDER BY requested_at, rowid")
        return [
            PendingRequest(
                device_id=r["device_id"],
                trigger=r["trigger"],
                requested_at=r["requested_at"],
                expires_at=r["expires_at"],
                round_id=r["round_id"] or None,
            )
            for r in rows
        ]

    def remove(self, device_id: str, round_id: str | None) -> None:
        self._db.execute(
            "DELETE FROM finetune_requests WHERE device_id = ? AND round_id = ?",
            (device_id, round_id or ""),
        )

    def drop_round(self, round_id: str) -> None:
        self._db.execute("DELETE FROM finetune_requests WHERE round_id = ?", (round_id,))

    def drop_expired(self, now: float) -> list[PendingRequest]:
        with self._db.transaction():
            expired = [r for r in self.pending() if r.expires_at <= now]
            self._db.execute("DELETE FROM finetune_requests WHERE expires_at <= ?", (now,))
        return expired
