"""The on-disk outbox: bounded, telemetry evicted first, records never dropped silently."""

from __future__ import annotations

import sqlite3

import pytest

from agent.spool import Priority, Spool, SpoolFull


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool.sqlite", max_messages=5)
    yield s
    s.close()


def put_telemetry(spool, n, start=0):
    return [
        spool.put(f"t/{i}", b"beat%d" % i, priority=Priority.TELEMETRY, qos=0)
        for i in range(start, start + n)
    ]


def test_messages_come_back_in_order_until_acked(spool):
    a = spool.put("fleet/d/job", b"a", priority=Priority.RECORD)
    b = spool.put("fleet/d/report", b"b", priority=Priority.RECORD)
    assert [i.payload for i in spool.pending(10)] == [b"a", b"b"]
    assert spool.ack(a)
    assert not spool.ack(a)  # a second PUBACK for the same row changes nothing
    assert [i.id for i in spool.pending(10)] == [b]
    assert spool.stats().acked == 1


def test_pending_skips_excluded_ids_and_respects_limit(spool):
    ids = put_telemetry(spool, 4)
    assert [i.id for i in spool.pending(2)] == ids[:2]
    assert [i.id for i in spool.pending(10, exclude=ids[:3])] == ids[3:]


def test_full_spool_evicts_oldest_telemetry_first_and_counts(spool):
    put_telemetry(spool, 3)
    spool.put("r/0", b"record0", priority=Priority.RECORD)
    spool.put("r/1", b"record1", priority=Priority.RECORD)
    spool.put("r/2", b"record2", priority=Priority.RECORD)  # evicts t/0
    spool.put("t/new", b"x", priority=Priority.TELEMETRY, qos=0)  # evicts t/1
    topics = [i.topic for i in spool.pending(10)]
    assert topics == ["t/2", "r/0", "r/1", "r/2", "t/new"]
    assert spool.stats().dropped_telemetry == 2


def test_record_refused_with_error_when_only_records_remain(spool):
    for i in range(5):
        spool.put(f"r/{i}", b"r", priority=Priority.RECORD)
    with pytest.raises(SpoolFull):
        spool.put("r/late", b"r", priority=Priority.RECORD)
    assert spool.put("t/late", b"t", priority=Priority.TELEMETRY) is None
    stats = spool.stats()
    assert (stats.depth, stats.refused_records, stats.dropped_telemetry) == (5, 1, 1)


def test_byte_bound_evicts_telemetry(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=100)
    spool.put("t", b"x" * 60, priority=Priority.TELEMETRY)
    spool.put("r", b"y" * 60, priority=Priority.RECORD)  # 120 > 100: the telemetry goes
    assert [i.topic for i in spool.pending(10)] == ["r"]
    with pytest.raises(ValueError, match="exceeds"):
        spool.put("big", b"z" * 101, priority=Priority.RECORD)


def test_rows_and_counters_survive_reopening(tmp_path):
    path = tmp_path / "spool.sqlite"
    first = Spool(path, max_messages=2)
    first.put("r", b"kept", priority=Priority.RECORD, retain=False)
    first.put("t", b"t", priority=Priority.TELEMETRY)
    first.put("t", b"t2", priority=Priority.TELEMETRY)  # evicts the first beat
    first.close()
    second = Spool(path, max_messages=2)
    items = second.pending(10)
    assert [i.payload for i in items] == [b"kept", b"t2"]
    assert items[0].priority is Priority.RECORD and items[0].qos == 1
    assert second.stats().dropped_telemetry == 1
    second.close()


def test_database_is_in_wal_mode(tmp_path):
    Spool(tmp_path / "s.sqlite", max_messages=10).close()
    mode = sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_the_spool_does_not_write_the_pages_an_acknowledged_message_frees(spool):
    """secure_delete FAST, not the ON Debian's SQLite defaults to (on a Pi: every freed page of
    an acknowledged report written again as zeros to the SD card)."""
    assert spool.run(lambda db: db.execute("PRAGMA secure_delete").fetchone()[0]) == 2  # FAST


def test_chunks_of_one_message_are_stored_all_or_none(spool):
    spool.put("r/0", b"r", priority=Priority.RECORD)
    spool.put("r/1", b"r", priority=Priority.RECORD)
    with pytest.raises(SpoolFull):
        spool.put_all("fleet/d/report", [b"c0", b"c1", b"c2", b"c3"], priority=Priority.RECORD)
    assert spool.stats().depth == 2  # no orphan chunks left behind
    ids = spool.put_all("fleet/d/report", [b"c0", b"c1", b"c2"], priority=Priority.RECORD)
    assert [i.payload for i in spool.pending(10, exclude=[])][2:] == [b"c0", b"c1", b"c2"]
    assert len(ids) == 3
