"""Rows held in memory beside SQLite (coordinator.hot_rows), through the device registry that
uses them: durable exactly when their transaction commits, taken back with a rolled-back
savepoint or transaction, and invisible to other threads until committed; an unchanged record
stays the same object, so the metrics snapshot derives only what changed."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from coordinator.clock import ManualClock
from coordinator.registry import FleetRegistry
from coordinator.service import FleetService
from coordinator.state_db import StateDB
from tests.coord_fleet_helpers import SimDevice, make_config

HASH = "ab" * 32


@pytest.fixture
def db(tmp_path):
    with StateDB.in_dir(tmp_path) as state:
        yield state


def reopened(tmp_path) -> FleetRegistry:
    """A registry over the same file, as a restarted actor builds it (reads SQLite only)."""
    return FleetRegistry(StateDB.in_dir(tmp_path), clock=lambda: 1000.0)


def test_changes_in_a_transaction_reach_sqlite_when_it_commits(tmp_path, db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    with db.transaction():
        registry.register("pi-1", base_model_hash=HASH, task="fan")
        registry.record_heartbeat("pi-1", at=1000.0, power_w=2.5)
        assert registry.get("pi-1").power_w == 2.5  # the writer sees its own change at once
        assert reopened(tmp_path).get("pi-1") is None  # nothing in the file before COMMIT
    record = reopened(tmp_path).get("pi-1")
    assert record is not None and record.power_w == 2.5 and record.cohort is not None


def test_a_rolled_back_savepoint_takes_its_changes_back_and_keeps_the_others(tmp_path, db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    with db.transaction():
        registry.register("pi-1", base_model_hash=HASH, task="fan")
        with pytest.raises(RuntimeError), db.transaction():  # one bad message of a batch
            registry.record_heartbeat("pi-1", at=1000.0, power_w=9.0)
            registry.register("pi-2", base_model_hash=HASH, task="fan")
            raise RuntimeError("the message's handler failed")
        with db.transaction():
            registry.record_heartbeat("pi-1", at=1001.0, temperature_c=40.0)
        assert registry.get("pi-2") is None
        assert registry.get("pi-1").power_w is None
    for view in (registry, reopened(tmp_path)):
        assert [r.device_id for r in view.devices()] == ["pi-1"]
        assert view.get("pi-1").power_w is None and view.get("pi-1").temperature_c == 40.0


def test_a_failed_transaction_leaves_neither_memory_nor_file_changed(tmp_path, db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    registry.register("pi-1", base_model_hash=HASH, task="fan")
    with pytest.raises(RuntimeError), db.transaction():
        registry.record_heartbeat("pi-1", at=1000.0, power_w=3.0)
        registry.remove("pi-1")
        raise RuntimeError("the batch failed")
    for view in (registry, reopened(tmp_path)):
        record = view.get("pi-1")
        assert record is not None and record.power_w is None


def test_a_transaction_sqlite_ended_itself_is_taken_back_in_memory_too(tmp_path, db):
    """On some errors (a full disk: SQLITE_FULL, SQLITE_IOERR) SQLite rolls the transaction
    back itself, and our ROLLBACK then fails ('no transaction is active'). The memory must be
    taken back all the same: else the writer keeps seeing the rolled-back record, and its next
    commit writes it to the file."""
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"), db.transaction() as conn:
        registry.register("pi-1", base_model_hash=HASH, task="fan")
        conn.execute("ROLLBACK")  # what SQLite did on its own
        raise sqlite3.OperationalError("database or disk is full")
    assert registry.get("pi-1") is None
    with db.transaction():
        registry.register("pi-2", base_model_hash=HASH, task="fan")
    for view in (registry, reopened(tmp_path)):
        assert [r.device_id for r in view.devices()] == ["pi-2"]


def test_after_sqlite_ended_the_batch_no_later_message_commits_on_its_own(tmp_path, db):
    """A batch goes on after one message's savepoint fails (FleetService._apply). If SQLite
    had rolled the whole transaction back itself (a full disk), a later SAVEPOINT would open a
    transaction of its own and its RELEASE commit it: that message's rows durable, its device
    record (written at the batch's COMMIT, which fails) not, and the batch unacknowledged."""
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    db.execute("CREATE TABLE applied (device TEXT)")
    with pytest.raises(sqlite3.OperationalError), db.transaction() as conn:
        for device in ("pi-1", "pi-2"):
            try:
                with db.transaction():
                    registry.register(device, base_model_hash=HASH, task="fan")
                    db.execute("INSERT INTO applied VALUES (?)", (device,))
                    if device == "pi-1":
                        conn.execute("ROLLBACK")  # what SQLite did on its own
                        raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError:
                pass  # the message refused alone, the batch goes on
    assert db.query("SELECT device FROM applied") == []
    assert registry.devices() == [] and reopened(tmp_path).devices() == []


def test_another_thread_sees_only_committed_records(db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    registry.register("pi-1", base_model_hash=HASH, task="fan")
    seen: dict[str, object] = {}

    def read(name: str) -> None:
        seen[name] = (registry.get("pi-1").power_w, [r.device_id for r in registry.devices()])

    with db.transaction():
        registry.record_heartbeat("pi-1", at=1000.0, power_w=4.0)
        registry.register("pi-2", base_model_hash=HASH, task="fan")
        reader = threading.Thread(target=read, args=("during",))
        reader.start()
        reader.join()
    reader = threading.Thread(target=read, args=("after",))
    reader.start()
    reader.join()
    assert seen == {"during": (None, ["pi-1"]), "after": (4.0, ["pi-1", "pi-2"])}


def test_a_removed_device_is_gone_after_a_restart(tmp_path, db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    registry.register("pi-1", base_model_hash=HASH, task="fan")
    registry.register("pi-2", base_model_hash=HASH, task="fan")
    assert registry.remove("pi-1") is True
    assert registry.remove("pi-404") is False
    assert [r.device_id for r in reopened(tmp_path).devices()] == ["pi-2"]


def test_the_metrics_snapshot_derives_again_only_the_devices_that_changed(tmp_path):
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    pi1, pi2 = SimDevice("pi-1", clock), SimDevice("pi-2", clock)
    service.ingest([pi1.presence(), pi1.heartbeat(), pi2.presence(), pi2.heartbeat()])
    before = {g.device_id: g for g in service.metrics_report().snapshot.devices}
    clock.advance(10.0)
    service.ingest([pi1.heartbeat(drift=2.5)])
    after = {g.device_id: g for g in service.metrics_report().snapshot.devices}
    assert after["pi-1"].drift_score == 2.5 and before["pi-1"].drift_score == 1.0
    assert after["pi-2"] is before["pi-2"]  # unchanged record and placement: reused


def test_committed_since_gives_the_rows_later_commits_changed_and_none_rolled_back(db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    with db.transaction():
        registry.register("pi-1", base_model_hash=HASH, task="fan")
        registry.register("pi-2", base_model_hash=HASH, task="fan")
    everything, version = registry.changed_since(0)
    assert sorted(r.device_id for r in everything) == ["pi-1", "pi-2"]
    with db.transaction():
        registry.record_heartbeat("pi-2", at=1001.0, power_w=3.0)
    with pytest.raises(RuntimeError), db.transaction():
        registry.record_heartbeat("pi-1", at=1002.0, power_w=9.0)
        raise RuntimeError("rolled back")
    changed, later = registry.changed_since(version)
    assert [(r.device_id, r.power_w) for r in changed] == [("pi-2", 3.0)] and later > version
    assert registry.changed_since(later) == ([], later)


def test_rows_loaded_at_start_are_all_given_from_version_zero(tmp_path, db):
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    with db.transaction():
        registry.register("pi-1", base_model_hash=HASH, task="fan")
    (loaded,), _ = reopened(tmp_path).changed_since(0)
    assert loaded.device_id == "pi-1"


def walked(registry: FleetRegistry) -> tuple[int, int]:
    """(devices, online) counted the long way, over every record."""
    records = registry.devices()
    return len(records), sum(r.online for r in records)


def test_the_counts_follow_each_commit_and_no_rollback_and_survive_a_restart(tmp_path, db):
    """/health's device counts, kept as commits land (HotRows.committed_tallies)."""
    registry = FleetRegistry(db, clock=lambda: 1000.0)
    assert registry.counts() == (0, 0)
    with db.transaction():
        for device in ("pi-1", "pi-2", "pi-3"):
            registry.register(device, base_model_hash=HASH, task="fan")
        registry.set_presence("pi-1", True, at=1000.0)
        registry.set_presence("pi-2", True, at=1000.0)
        assert registry.counts() == (0, 0)  # committed rows only, as any reader sees them
    assert registry.counts() == (3, 2) == walked(registry)
    fans = {registry.get("pi-1").cohort}
    assert registry.committed_cohorts() == fans
    registry.set_presence("pi-2", False, at=1001.0)  # online, then offline: counted once
    registry.set_presence("pi-2", True, at=1002.0)
    registry.set_presence("pi-2", False, at=1003.0)
    assert registry.counts() == (3, 1) == walked(registry)
    with pytest.raises(RuntimeError), db.transaction():
        registry.set_presence("pi-3", True, at=1004.0)
        registry.remove("pi-1")
        with db.transaction():  # a savepoint released into the transaction that fails
            registry.register("pi-4", base_model_hash=HASH, task="fan")
        raise RuntimeError("rolled back")
    assert registry.counts() == (3, 1) == walked(registry)
    assert registry.remove("pi-1") is True  # an online device removed: both counts fall
    assert registry.counts() == (2, 0) == walked(registry)
    registry.register("har-1", base_model_hash=HASH, task="har")
    assert registry.committed_cohorts() == fans | {registry.get("har-1").cohort}
    registry.remove("har-1")  # the cohort's last device: the cohort goes with it
    assert registry.committed_cohorts() == fans
    registry.set_presence("pi-3", True, at=1005.0)
    assert reopened(tmp_path).counts() == (2, 1) == registry.counts()


def test_rows_by_group_follow_moves_deletes_and_rollbacks_as_each_thread_sees_them(db):
    from coordinator.hot_rows import HotRows

    db.ensure_schema("CREATE TABLE IF NOT EXISTS grouped (k TEXT PRIMARY KEY, g TEXT NOT NULL)")
    upsert = "INSERT INTO grouped VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET g = excluded.g"
    rows = HotRows(
        db, {}, upsert=(upsert, lambda r: r), delete="DELETE FROM grouped WHERE k = ?",
        group=lambda r: r[1],
    )  # fmt: skip
    with db.transaction():
        rows.put("a", ("a", "x"))
        rows.put("b", ("b", "x"))
        rows.put("c", ("c", "y"))
    assert sorted(rows.values_in("x")) == [("a", "x"), ("b", "x")]
    seen: dict[str, list] = {}
    with db.transaction():
        rows.put("a", ("a", "y"))  # moved to another group
        rows.put("b", None)
        assert rows.values_in("x") == []  # as this transaction sees it
        assert sorted(rows.values_in("y")) == [("a", "y"), ("c", "y")]
        reader = threading.Thread(target=lambda: seen.update(x=sorted(rows.values_in("x"))))
        reader.start()
        reader.join()
    assert seen["x"] == [("a", "x"), ("b", "x")]  # another thread: the committed rows
    assert rows.values_in("x") == [] and sorted(rows.values_in("y")) == [("a", "y"), ("c", "y")]
    with pytest.raises(RuntimeError), db.transaction():
        rows.put("c", ("c", "z"))
        raise RuntimeError("rolled back")
    assert rows.values_in("z") == [] and sorted(rows.values_in("y")) == [("a", "y"), ("c", "y")]
    stored = sorted(tuple(r) for r in db.query("SELECT k, g FROM grouped"))
    assert stored == [("a", "y"), ("c", "y")]
    ungrouped = HotRows(
        db, {}, upsert=(upsert, lambda r: r), delete="DELETE FROM grouped WHERE k = ?"
    )
    with pytest.raises(TypeError):
        ungrouped.values_in("x")
    with pytest.raises(TypeError):  # nor tallied
        ungrouped.committed_tallies()
