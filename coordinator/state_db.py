"""The one SQLite file (WAL) that holds the coordinator's durable state.

Registry, job table, round table, adapter store and rollouts all write through to it and read back
from it: a restarted Ray actor re-runs __init__ with empty memory and must carry on from disk. WAL
lets several actors (separate processes) read while one writes; writers wait up to busy_timeout.
Each component owns its tables and passes its DDL to ensure_schema().
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

DB_FILENAME = "coordinator.sqlite3"

Params = Sequence[Any] | dict[str, Any]


def sql_values(values: Iterable[StrEnum]) -> str:
    """Enum values as an SQL list of string literals, sorted: `'A', 'B'` (for `IN (...)` in a
    statement or a partial index, whose text must be the same each time it is made)."""
    return ", ".join(f"'{v.value}'" for v in sorted(values))


class TransactionHooks(Protocol):
    """State kept in memory beside SQLite (coordinator.hot_rows) follows the transactions of
    the thread that changes it: told of each (nested) begin, its rollback or release, and the
    outermost commit, before (write the rows) and after (they are durable)."""

    def begun(self) -> None: ...

    def rolled_back(self) -> None: ...

    def released(self) -> None: ...

    def before_commit(self) -> None: ...

    def committed(self) -> None: ...


class StateDB:
    """One SQLite connection per thread over one file.

    The actor's default thread writes (ingest, tick and operator requests each in one
    transaction); its health and query threads read through connections of their own, so a long
    tick never blocks them: under WAL a reader sees the last committed state, never half a tick.
    """

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._closed = False
        self._hooks: list[TransactionHooks] = []
        self._conn()  # open (and create) the file now: a bad path fails at start, not later

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise sqlite3.ProgrammingError(f"{self.path} is closed")
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL under WAL survives a process crash; a power cut may lose the last commits, which
        # the idempotent job/report handling tolerates, and it avoids an fsync per heartbeat.
        conn.execute("PRAGMA synchronous=NORMAL")
        # Debian builds SQLite with secure_delete on: a freed page is overwritten with zeros, a
        # write of its own for every page a delete frees (dropping a 10,000-device round's report
        # arrays: 0.44-0.47 s of CPU, against 0.08). FAST zeroes deleted content where the page
        # is written anyway; freed pages keep theirs until they are reused.
        conn.execute("PRAGMA secure_delete=FAST")
        self._local.conn, self._local.depth = conn, 0
        with self._all_lock:
            self._all.append(conn)
        return conn

    @classmethod
    def in_dir(cls, state_dir: str | Path) -> StateDB:
        return cls(Path(state_dir) / DB_FILENAME)

    def add_hooks(self, hooks: TransactionHooks) -> None:
        self._hooks.append(hooks)

    @property
    def in_transaction(self) -> bool:
        """Whether this thread is inside transaction() (its writes commit with it)."""
        return bool(getattr(self._local, "depth", 0))

    def ensure_schema(self, ddl: str) -> None:
        self._conn().executescript(ddl)

    def add_missing_columns(self, table: str, columns: dict[str, str]) -> None:
        """Columns a newer release added (nullable): a state dir from before still opens."""
        conn = self._conn()
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        for name, sql_type in columns.items():
            if name not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT. Opened inside another one it is a SAVEPOINT: its own
        writes roll back if it raises, and they commit only with the outer transaction."""
        conn = self._conn()
        depth = self._local.depth
        if depth == 0:
            # IMMEDIATE takes the write lock up front, so a read-modify-write cannot interleave
            # with another connection's and fail at commit time.
            rollback: tuple[str, ...] = ("ROLLBACK",)
            begin, commit = "BEGIN IMMEDIATE", "COMMIT"
        else:
            if not conn.in_transaction:  # SQLite rolled the outer one back itself (a full disk):
                # a SAVEPOINT now would be a transaction of its own, committed by its RELEASE
                raise sqlite3.OperationalError("the enclosing transaction was rolled back")
            name = f"sp{depth}"
            begin, commit = f"SAVEPOINT {name}", f"RELEASE {name}"
            rollback = (f"ROLLBACK TO {name}", f"RELEASE {name}")
        conn.execute(begin)
        self._local.depth = depth + 1
        for hooks in self._hooks:
            hooks.begun()
        try:
            yield conn
            if depth == 0:
                for hooks in self._hooks:
                    hooks.before_commit()  # rows kept in memory join the transaction
            conn.execute(commit)
        except BaseException:
            try:
                # On some errors (a full disk, an I/O error) SQLite has rolled the whole
                # transaction back itself: a ROLLBACK now would fail and hide the cause.
                if conn.in_transaction:
                    for statement in rollback:
                        conn.execute(statement)
            finally:  # memory follows the file whatever the rollback statement did
                for hooks in self._hooks:
                    hooks.rolled_back()
            raise
        finally:
            self._local.depth = depth
        for hooks in self._hooks:
            if depth == 0:
                hooks.committed()
            else:
                hooks.released()

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn().execute(sql, params).fetchone()
        return row

    def execute(self, sql: str, params: Params = ()) -> int:
        """Runs one statement (in its own transaction unless inside one); returns rowcount."""
        return self._conn().execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Params]) -> int:
        return self._conn().executemany(sql, rows).rowcount

    def trace(self, callback: Callable[[str], object] | None) -> None:
        """This thread's connection hands each statement it runs to `callback` (None: no
        more); for counting them (skipfleet.bench_fleet_state)."""
        self._conn().set_trace_callback(callback)

    def close(self) -> None:
        with self._all_lock:
            self._closed = True
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
