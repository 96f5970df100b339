"""The one SQLite file (WAL) that holds the coordinator's durable state.

Registry, job table, round table, adapter store and rollouts all write through to it and read back
from it: a restarted Ray actor re-runs __init__ with empty memory and must carry on from disk. WAL
lets several actors (separate processes) read while one writes; writers wait up to busy_timeout.
Each component owns its tables and passes its DDL to ensure_schema().
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DB_FILENAME = "coordinator.sqlite3"

Params = Sequence[Any] | dict[str, Any]


class StateDB:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per process, shared by the actor's threads (e.g. a health concurrency
        # group): the lock serialises them, which sqlite3 requires of a shared connection.
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL survives a process crash; a power cut may lose the last commits, which
        # the idempotent job/report handling tolerates, and it avoids an fsync per heartbeat.
        self._conn.execute("PRAGMA synchronous=NORMAL")

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> StateDB:
        return cls(Path(state_dir) / DB_FILENAME)

    def ensure_schema(self, ddl: str) -> None:
        with self._lock:
            self._conn.executescript(ddl)

    def add_missing_columns(self, table: str, columns: dict[str, str]) -> None:
        """Columns a newer release added (nullable): a state dir from before still opens."""
        with self._lock:
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in columns.items():
                if name not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            self._conn.commit()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; a transaction opened inside another one joins it."""
        with self._lock:
            if self._conn.in_transaction:
                yield self._conn
                return
            # IMMEDIATE takes the write lock up front, so a read-modify-write cannot interleave
            # with another process's and fail at commit time.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def execute(self, sql: str, params: Params = ()) -> int:
        """Runs one statement (in its own transaction unless inside one); returns rowcount."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
