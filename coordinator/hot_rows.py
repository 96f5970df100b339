"""Rows held in memory beside their SQLite table, written when the transaction commits.

The fleet actor reads and rewrites a device's record several times for each message it applies;
doing that in SQLite cost a query and an upsert each time. HotRows keeps every row in memory
(loaded once, when the state opens) and lets the writing thread change them freely inside a
transaction: the changed rows are written with one executemany just before the outermost COMMIT,
so they are durable exactly when the rest of the transaction is. A savepoint that rolls back
(one bad message in a batch) takes its changes back in memory too; so does a failed transaction.

Readers on other threads (the actor's query and health groups) see the committed rows only, as
a WAL reader of the table would. One writer per state dir (the instance lock) keeps the memory
and the file the same: nothing else writes the table.

TransactionalNotes does the same for things noted in memory only (metric events, the keys of
state messages already applied): they count when their transaction commits, and are undone
when it rolls back.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from coordinator.state_db import StateDB

Row = TypeVar("Row")
Item = TypeVar("Item")
_ABSENT: Any = object()  # "no pending change" in an undo entry


class _Pending(threading.local):
    """One thread's uncommitted changes: key -> row (None: deleted), and an undo log per open
    (nested) transaction: key -> what it was before that transaction changed it."""

    def __init__(self) -> None:
        self.changes: dict[str, Any] = {}
        self.undo: list[dict[str, Any]] = []


class HotRows(Generic[Row]):
    def __init__(
        self,
        db: StateDB,
        rows: dict[str, Row],
        *,
        upsert: tuple[str, Callable[[Row], tuple[Any, ...]]],
        delete: str,
        delete_params: Callable[[str], tuple[Any, ...]] = lambda key: (key,),
        tally: Callable[[Row], Hashable] | None = None,
        group: Callable[[Row], Hashable] | None = None,
    ) -> None:
        """`rows`: the table as loaded; `upsert`: the statement and a row's parameters;
        `delete`: the statement that deletes a key, and its parameters for a key; `tally`: what
        committed_tallies() counts the rows by (e.g. a device's cohort and whether it is
        online); `group`: what values_in() reads the rows by (e.g. a placement's cohort). Each
        is kept as commits merge only if given."""
        self._db = db
        self._committed = rows
        self._tally, self._group = tally, group
        self._tallies: Counter[Hashable] = Counter()
        self._groups: dict[Hashable, dict[str, Row]] = {}  # committed rows by group, if grouped
        for key, row in rows.items():
            self._count_in(key, row)
        self._lock = threading.Lock()  # the writer merges a commit while readers copy
        self._upsert_sql, self._params = upsert
        self._delete_sql, self._delete_params = delete, delete_params
        self._pending = _Pending()
        # Commits merged so far (the rows as loaded: 1), and the one that last changed each key
        # (for committed_since)
        self._version = 1
        self._changed_in: dict[str, int] = dict.fromkeys(rows, 1)
        db.add_hooks(self)

    # ---- reads

    def get(self, key: str) -> Row | None:
        changes = self._pending.changes
        if key in changes:
            row: Row | None = changes[key]
            return row
        return self._committed.get(key)

    def values(self) -> Iterator[Row]:
        """Every row as this thread sees it (its own uncommitted changes included)."""
        with self._lock:
            rows = dict(self._committed)
        return iter(self._as_seen(rows, lambda row: True).values())

    def values_in(self, group: Hashable) -> list[Row]:
        """The rows of one `group` as this thread sees them, without a walk of the others (a
        filter over every row made a pass over each cohort cost the whole fleet's rows)."""
        by_group = self._group
        if by_group is None:
            raise TypeError("values_in needs HotRows made with a group")
        with self._lock:
            rows = dict(self._groups.get(group, {}))
        return list(self._as_seen(rows, lambda row: by_group(row) == group).values())

    def _as_seen(self, rows: dict[str, Row], belongs: Callable[[Row], bool]) -> dict[str, Row]:
        """A copy of committed `rows` with this thread's uncommitted changes laid over it: a
        row deleted, or changed to one that no longer `belongs`, leaves it."""
        for key, row in self._pending.changes.items():
            if row is None or not belongs(row):
                rows.pop(key, None)
            else:
                rows[key] = row
        return rows

    def committed_since(self, version: int) -> tuple[list[Row], int]:
        """The committed rows a commit after `version` changed (deleted ones left out), and
        the version to ask from next time (0: every row)."""
        with self._lock:
            rows = [
                row
                for key, changed in self._changed_in.items()
                if changed > version and (row := self._committed.get(key)) is not None
            ]
            return rows, self._version

    def committed_tallies(self) -> dict[Hashable, int]:
        """How many committed rows have each `tally` (a tally no row has: left out), kept as
        commits merge: no walk of the rows (a /health poll walked 10,000 device records: ~13 ms
        of the actor in a round)."""
        if self._tally is None:
            raise TypeError("committed_tallies needs HotRows made with a tally")
        with self._lock:
            return dict(self._tallies)

    # ---- writes (inside a transaction)

    def put(self, key: str, row: Row | None) -> None:
        """Changes (None: deletes) a row in the caller's transaction."""
        if not self._db.in_transaction:
            raise RuntimeError("HotRows.put outside a transaction")
        pending = self._pending
        undo = pending.undo[-1]
        if key not in undo:
            undo[key] = pending.changes.get(key, _ABSENT)
        pending.changes[key] = row

    # ---- TransactionHooks (called by StateDB on the writing thread)

    def begun(self) -> None:
        self._pending.undo.append({})

    def rolled_back(self) -> None:
        pending = self._pending
        for key, before in pending.undo.pop().items():
            if before is _ABSENT:
                pending.changes.pop(key, None)
            else:
                pending.changes[key] = before

    def released(self) -> None:
        pending = self._pending
        inner = pending.undo.pop()
        outer = pending.undo[-1]
        for key, before in inner.items():
            outer.setdefault(key, before)  # the outer one keeps its own, older, state

    def before_commit(self) -> None:
        changes = self._pending.changes
        if not changes:
            return
        saved = [self._params(row) for row in changes.values() if row is not None]
        deleted = [self._delete_params(key) for key, row in changes.items() if row is None]
        if saved:
            self._db.executemany(self._upsert_sql, saved)
        if deleted:
            self._db.executemany(self._delete_sql, deleted)

    def committed(self) -> None:
        pending = self._pending
        pending.undo.pop()
        changes, pending.changes = pending.changes, {}
        if not changes:
            return
        with self._lock:
            self._version += 1
            for key, row in changes.items():
                before = self._committed.get(key)
                if before is not None:
                    self._count_out(key, before)
                if row is None:
                    self._committed.pop(key, None)
                    self._changed_in.pop(key, None)
                else:
                    self._count_in(key, row)
                    self._committed[key] = row
                    self._changed_in[key] = self._version

    def _count_in(self, key: str, row: Row) -> None:
        """A committed row's share of the tallies and groups (with _lock held)."""
        if self._tally is not None:
            self._tallies[self._tally(row)] += 1
        if self._group is not None:
            self._groups.setdefault(self._group(row), {})[key] = row

    def _count_out(self, key: str, row: Row) -> None:
        if self._tally is not None:
            tallied = self._tally(row)
            self._tallies[tallied] -= 1
            if not self._tallies[tallied]:
                del self._tallies[tallied]
        if self._group is not None:
            group = self._group(row)
            members = self._groups[group]
            del members[key]
            if not members:
                del self._groups[group]


class _Levels(threading.local):
    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # per open (nested) transaction: what it noted


class TransactionalNotes(Generic[Item]):
    """Things noted in memory inside a transaction (metric events, message keys), kept per
    nested level: a level that rolls back hands its notes to `undo`, the outermost commit hands
    them all to `commit`. Outside a transaction, note() is commit() at once."""

    def __init__(
        self,
        db: StateDB,
        *,
        commit: Callable[[list[Item]], None],
        undo: Callable[[list[Item]], None] = lambda items: None,
    ) -> None:
        self._commit, self._undo = commit, undo
        self._levels = _Levels()
        db.add_hooks(self)

    def note(self, item: Item) -> None:
        stack = self._levels.stack
        if stack:
            stack[-1].append(item)
        else:
            self._commit([item])

    def begun(self) -> None:
        self._levels.stack.append([])

    def rolled_back(self) -> None:
        self._undo(self._levels.stack.pop())

    def released(self) -> None:
        stack = self._levels.stack
        stack[-2].extend(stack.pop())

    def before_commit(self) -> None:
        pass

    def committed(self) -> None:
        notes = self._levels.stack.pop()
        if notes:
            self._commit(notes)
