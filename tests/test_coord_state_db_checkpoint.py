"""The fleet state's WAL is checkpointed by a thread of its own (coordinator.state_db), not by
the commit that crosses SQLite's 1,000 pages on the fleet actor's writing thread."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.fleet import Fleet
from coordinator.state_db import DB_FILENAME, StateDB
from shared.mqtt import MqttSettings

ROW = b"x" * 4000  # about a page a row


def write_rows(db: StateDB, rows: int) -> None:
    db.ensure_schema("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB)")
    for start in range(0, rows, 100):
        with db.transaction():
            db.executemany("INSERT INTO t (v) VALUES (?)", [(ROW,)] * min(100, rows - start))


def autocheckpoint(db: StateDB) -> int:
    (pages,) = db.query_one("PRAGMA wal_autocheckpoint")
    return int(pages)


def checkpointers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "wal-checkpoint"]


def test_with_a_checkpointer_commits_never_checkpoint_and_its_thread_copies_the_wal(tmp_path):
    db = StateDB(tmp_path / DB_FILENAME, checkpoint_interval_s=0.05)
    try:
        assert autocheckpoint(db) == 0  # a commit never copies the WAL back itself
        write_rows(db, 2000)  # ~8 MB: SQLite's own way would have checkpointed on commits
        deadline = time.monotonic() + 10
        while db.path.stat().st_size < 2000 * 4000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert db.path.stat().st_size >= 2000 * 4000  # the rows are in the file, not only the WAL
    finally:
        db.close()
    assert not checkpointers()  # close() stops the thread before the connections close


def test_without_one_sqlite_checkpoints_as_it_always_did_and_no_thread_starts(tmp_path):
    before = len(checkpointers())
    db = StateDB(tmp_path / DB_FILENAME)
    try:
        assert autocheckpoint(db) == 1000 and len(checkpointers()) == before
    finally:
        db.close()


def test_the_rows_of_a_checkpointed_state_are_all_there_when_it_is_opened_again(tmp_path):
    db = StateDB(tmp_path / DB_FILENAME, checkpoint_interval_s=0.05)
    write_rows(db, 500)
    time.sleep(0.2)  # a checkpoint or more ran while the rows were written
    write_rows(db, 500)  # and these may be in the WAL only
    db.close()
    again = StateDB(tmp_path / DB_FILENAME)
    try:
        assert again.query_one("SELECT count(*) FROM t")[0] == 1000
    finally:
        again.close()


def test_the_fleet_state_runs_with_a_checkpointer(tmp_path):
    config = CoordinatorConfig(mqtt=MqttSettings("localhost"), state_dir=tmp_path)
    fleet = Fleet.open(config)
    try:
        assert autocheckpoint(fleet.db) == 0 and checkpointers()
    finally:
        fleet.close()


@pytest.mark.parametrize("interval", [0.0, -1.0])
def test_a_checkpoint_interval_that_is_not_positive_is_refused(tmp_path, interval):
    with pytest.raises(ValueError, match="checkpoint_interval_s must be > 0"):
        StateDB(tmp_path / DB_FILENAME, checkpoint_interval_s=interval)


def test_a_state_db_dropped_without_close_is_not_kept_alive_by_its_checkpointer(tmp_path):
    import gc
    import weakref

    before = set(checkpointers())
    db = StateDB(tmp_path / DB_FILENAME, checkpoint_interval_s=0.05)
    (thread,) = set(checkpointers()) - before
    gone = weakref.ref(db)
    del db
    gc.collect()
    assert gone() is None
    thread.join(timeout=5)
    assert not thread.is_alive()
