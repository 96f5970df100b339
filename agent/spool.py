"""A bounded on-disk outbox: everything the device sends goes here first.

paho keeps unacknowledged messages in memory only, so a report made while the broker is away
would die with the process. Rows leave the spool only when the broker acknowledges them (PUBACK,
see `agent.outbox`). SQLite in WAL mode: one file, crash-safe, readers never block the writer.

Bounds: `max_messages` rows and `max_bytes` of payload. When full, the oldest telemetry goes
first (and is counted); a record (job status, report) is never dropped: if nothing can be
evicted, `put` raises `SpoolFull` and the caller must tell the coordinator another way.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
# Work done in the transaction that spools a message (agent.kept_results keeps a job's result
# beside it): spooled and kept together, or neither.
AlsoInTransaction = Callable[[sqlite3.Connection], None]

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_priority ON outbox (priority, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Priority(IntEnum):
    TELEMETRY = 0  # may be evicted when the spool is full
    RECORD = 1  # job statuses, reports: never evicted


class Counter:
    """Names of the persisted counters (they survive restarts, like the rows)."""

    DROPPED_TELEMETRY = "dropped_telemetry"
    REFUSED_RECORDS = "refused_records"
    ACKED = "acked"


class SpoolFull(Exception):
    """A record could not be stored: the spool holds only records and is at its bound."""


class _NoRoom(Exception):
    """Internal: evicting every telemetry row still leaves no room."""


@dataclass(frozen=True)
class SpoolItem:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    priority: Priority
    created: float


@dataclass(frozen=True)
class SpoolStats:
    depth: int
    bytes: int
    dropped_telemetry: int
    refused_records: int
    acked: int


class Spool:
    def __init__(
        self,
        path: Path,
        *,
        max_messages: int,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ):
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("spool bounds must be positive")
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()  # one connection shared by the agent's threads
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        # WAL: crash-safe appends without rewriting the file; NORMAL sync: a power cut may lose
        # the last commits but never corrupts the file (the SD-card-friendly trade-off).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Debian's SQLite (so Raspberry Pi OS's) defaults to secure_delete=ON: every page a
        # delete frees (an acknowledged report's overflow pages, but the one that becomes the
        # free list's trunk) is written again as zeros: a CNN's float32 report (53 kB) cost
        # the SD card 134 kB of writes instead of 88 (skipfleet bench agent; an MLP's 8 kB
        # report frees one page: no change). FAST zeroes deleted content only in pages written
        # anyway; freed pages keep it until they are reused.
        self._db.execute("PRAGMA secure_delete=FAST")
        self._db.executescript(SCHEMA)

    def put(
        self, topic: str, payload: bytes, *, priority: Priority, qos: int = 1, retain: bool = False
    ) -> int | None:
        """Store a message; returns its id, or None if it was telemetry that did not fit."""
        ids = self.put_all(topic, [payload], priority=priority, qos=qos, retain=retain)
        return None if ids is None else ids[0]

    def put_all(
        self,
        topic: str,
        payloads: list[bytes],
        *,
        priority: Priority,
        qos: int = 1,
        retain: bool = False,
        also: AlsoInTransaction | None = None,
    ) -> list[int] | None:
        """Store the pieces of one message (chunks) all or none: half a report is no report.
        `also` runs in the same transaction (its failure spools nothing)."""
        if any(len(p) > self._max_bytes for p in payloads):
            raise ValueError(f"a payload exceeds the spool's {self._max_bytes} bytes")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [self._insert(topic, p, priority, qos, retain) for p in payloads]
                if also is not None:
                    also(self._db)
            except _NoRoom:
                self._db.execute("ROLLBACK")
                refused = priority is not Priority.TELEMETRY
                # Counted after the rollback, in a transaction of its own: it must stay counted.
                self._db.execute("BEGIN IMMEDIATE")
                self._bump(Counter.REFUSED_RECORDS if refused else Counter.DROPPED_TELEMETRY)
                self._db.execute("COMMIT")
                if refused:
                    raise SpoolFull(f"spool full of records ({self._max_messages} max)") from None
                return None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return ids

    def _insert(
        self, topic: str, payload: bytes, priority: Priority, qos: int, retain: bool
    ) -> int:
        if not self._make_room(len(payload)):
            raise _NoRoom
        cursor = self._db.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, priority, created)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (topic, payload, qos, int(retain), int(priority), self._clock()),
        )
        return int(cursor.lastrowid)

    def _make_room(self, incoming_bytes: int) -> bool:
        """Evict oldest telemetry until one more message of this size fits; False if it can't."""
        while True:
            rows, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
            if rows < self._max_messages and size + incoming_bytes <= self._max_bytes:
                return True
            oldest = self._db.execute(
                "SELECT id FROM outbox WHERE priority = ? ORDER BY id LIMIT 1",
                (int(Priority.TELEMETRY),),
            ).fetchone()
            if oldest is None:
                return False
            self._db.execute("DELETE FROM outbox WHERE id = ?", oldest)
            self._bump(Counter.DROPPED_TELEMETRY)

    def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work` on the spool's database in one transaction of its own (for tables kept beside
        the outbox: agent.kept_results)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def pending(self, limit: int, exclude: Collection[int] = ()) -> list[SpoolItem]:
        """The oldest messages not in `exclude` (those already handed to the broker), in order."""
        placeholders = ",".join("?" * len(exclude))
        where = f"WHERE id NOT IN ({placeholders})" if exclude else ""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain, priority, created FROM outbox"
                f" {where} ORDER BY id LIMIT ?",
                (*exclude, limit),
            ).fetchall()
        return [
            SpoolItem(
                id=r[0],
                topic=r[1],
                payload=bytes(r[2]),
                qos=r[3],
                retain=bool(r[4]),
                priority=Priority(r[5]),
                created=r[6],
            )
            for r in rows
        ]

    def ack(self, item_id: int) -> bool:
        """Delete a message the broker has acknowledged; False if it was already gone."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            deleted = self._db.execute("DELETE FROM outbox WHERE id = ?", (item_id,)).rowcount
            if deleted:
                self._bump(Counter.ACKED)
            self._db.execute("COMMIT")
        return bool(deleted)

    def stats(self) -> SpoolStats:
        with self._lock:
            rows, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
            ).fetchone()
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return SpoolStats(
            depth=rows,
            bytes=size,
            dropped_telemetry=counters.get(Counter.DROPPED_TELEMETRY, 0),
            refused_records=counters.get(Counter.REFUSED_RECORDS, 0),
            acked=counters.get(Counter.ACKED, 0),
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _bump(self, name: str) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1)"
            " ON CONFLICT(name) DO UPDATE SET value = value + 1",
            (name,),
        )
