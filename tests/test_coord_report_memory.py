"""Report arrays held in memory until their round reads them; the durable copy is in the round's
arrays file (coordinator.round_arrays), the row saying where, and a report stored by an earlier
version (a file, or a .npz or msgpack blob in its row) is still read."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest

from coordinator import reports, round_arrays
from coordinator.reports import (
    ReportMeta,
    ReportStore,
    ReportUnreadable,
    arrays_blob,
    infer_shape,
)
from coordinator.round_arrays import FOLDER, StorageFailed
from coordinator.state_db import StateDB
from tests.coord_helpers import random_factors


def saved(
    store: ReportStore, job_id: str, arrays: dict, round_id: str | None = "r1", checked=True
) -> ReportMeta:
    meta = ReportMeta(
        job_id=job_id, device_id=f"dev-{job_id}", round_id=round_id, cohort="fan",
        base_model_hash="h", samples=10, shape=infer_shape("d", arrays),
        parent_adapter_version=None, received_at=1.0,
    )  # fmt: skip
    store.save(meta, arrays, checked_on_receipt=checked)
    return meta


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# A row as the earliest versions left it: its arrays in a file of their own.
OLDER_RELEASE = (
    "UPDATE fit_reports SET arrays = NULL, arrays_file = NULL, arrays_at = NULL, "
    "arrays_len = NULL, file = ?"
)
# A row as the last versions left it: its arrays in a blob in the row (msgpack, earlier .npz).
IN_ROW = (
    "UPDATE fit_reports SET arrays = ?, arrays_file = NULL, arrays_at = NULL, arrays_len = NULL"
)


def round_file(state_dir, round_id: str = "r1") -> Path | None:
    """The round's one arrays file (None: it has none)."""
    files = list((state_dir / FOLDER).glob(f"{round_id.encode().hex()}.*.arrays"))
    assert len(files) <= 1, files
    return files[0] if files else None


def test_a_report_is_read_from_memory_once_then_from_its_rounds_file(tmp_path):
    arrays = random_factors(np.random.default_rng(0))
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    meta = saved(store, "j1", arrays)
    assert meta.file == "" and not (tmp_path / "reports").exists()  # no file per report
    assert db.query_one("SELECT arrays FROM fit_reports")["arrays"] is None  # not in the row
    round_file(tmp_path).write_bytes(b"")  # the held copy answers: the file is not read
    first = store.result(meta)
    assert same(first.arrays, arrays) and all(a.flags.writeable for a in first.arrays.values())
    assert first.checked_on_receipt  # the arrays checked when the report arrived
    with pytest.raises(
        ReportUnreadable, match=r"j1.*bytes 0\+\d+ of .*\(0 bytes\)"
    ):  # taken out: the file is
        store.result(meta)  # read, and it is emptied


def test_a_rounds_reports_are_appended_to_one_file_each_read_back_where_its_row_says(tmp_path):
    rng = np.random.default_rng(12)
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    written = {f"j{i}": random_factors(rng) for i in range(3)}
    for job, arrays in written.items():
        saved(store, job, arrays, checked=False)
    saved(store, "other", random_factors(rng), round_id="r2", checked=False)
    sizes = [len(arrays_blob(a)) for a in written.values()]
    assert round_file(tmp_path).stat().st_size == sum(sizes)  # the three, end to end
    assert round_file(tmp_path).stat().st_mode & 0o777 == 0o600  # the coordinator's alone
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    for job, arrays in written.items():
        assert same(restarted.result(restarted.get(job)).arrays, arrays)


def test_a_report_not_checked_on_receipt_is_not_held_and_reads_back_unmarked(tmp_path):
    arrays = random_factors(np.random.default_rng(8))
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    meta = saved(store, "j1", arrays, checked=False)
    result = store.result(meta)  # from its file: the round's check reads its values
    assert same(result.arrays, arrays) and not result.checked_on_receipt


def test_arrays_read_back_from_a_row_are_not_marked_as_checked_on_receipt(tmp_path):
    """A row read back could be damaged on disk: the round's check reads its values again."""
    arrays = random_factors(np.random.default_rng(5))
    store = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    meta = saved(store, "j1", arrays)
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    result = restarted.result(meta)
    assert same(result.arrays, arrays) and not result.checked_on_receipt
    assert (result.device_id, result.num_samples) == (meta.device_id, meta.samples)


def test_a_restarted_store_and_one_past_its_cap_read_the_rows(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    store = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    one, two = random_factors(rng), random_factors(rng)
    monkeypatch.setattr(reports, "MEMORY_CAP_BYTES", sum(a.nbytes for a in one.values()))
    m1, m2 = saved(store, "j1", one), saved(store, "j2", two)  # j1 leaves memory for j2
    assert same(store.result(m1).arrays, one) and same(store.result(m2).arrays, two)
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    assert same(restarted.result(restarted.get("j1")).arrays, one)
    assert same(restarted.result(restarted.get("j2")).arrays, two)


def test_a_report_outside_any_round_keeps_no_arrays_in_memory_or_in_its_row(tmp_path):
    """Nothing aggregates a device's own fine-tune: holding it only filled memory up to the cap,
    and its stored arrays the state file."""
    arrays = random_factors(np.random.default_rng(2))
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    meta = saved(store, "own", arrays, round_id=None)
    assert store.get("own") == meta  # the row is kept: the device views list it
    assert db.query_one("SELECT arrays FROM fit_reports WHERE job_id = 'own'")["arrays"] is None
    with pytest.raises(ReportUnreadable, match="own"):
        store.result(meta)


def test_a_report_stored_as_a_file_by_an_older_release_is_read_from_its_file(tmp_path):
    arrays = random_factors(np.random.default_rng(3))
    db = StateDB(tmp_path / "s.sqlite3")
    saved(ReportStore(db, tmp_path), "old", arrays, checked=False)
    (tmp_path / "reports").mkdir()
    np.savez(tmp_path / "reports" / "old.npz", **arrays)
    db.execute(OLDER_RELEASE, ("reports/old.npz",))  # as it was
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    meta = restarted.get("old")
    assert meta.file == "reports/old.npz" and same(restarted.result(meta).arrays, arrays)


def test_a_report_stored_as_a_blob_in_its_row_by_the_last_version_is_read_from_its_row(tmp_path):
    arrays = random_factors(np.random.default_rng(13))
    db = StateDB(tmp_path / "s.sqlite3")
    saved(ReportStore(db, tmp_path), "row", arrays, checked=False)
    round_file(tmp_path).unlink()  # as it was: the arrays in the row, no file
    db.execute(IN_ROW, (arrays_blob(arrays),))
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    assert same(restarted.result(restarted.get("row")).arrays, arrays)


def test_a_report_stored_as_a_npz_blob_by_an_earlier_version_is_read_from_its_row(tmp_path):
    arrays = random_factors(np.random.default_rng(6))
    db = StateDB(tmp_path / "s.sqlite3")
    saved(ReportStore(db, tmp_path), "npz", arrays, checked=False)
    blob = io.BytesIO()
    np.savez(blob, **arrays)
    db.execute(IN_ROW + " WHERE job_id = 'npz'", (blob.getvalue(),))
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    read = restarted.result(restarted.get("npz")).arrays
    assert same(read, arrays) and all(a.flags.writeable for a in read.values())


@pytest.mark.parametrize(
    "damage", [b"\x93", b"not msgpack at all", b"\x81\xa2A1\x81\xa5dtype\xa3|O8", b"PK\x03\x04junk"]
)
def test_a_damaged_blob_or_a_missing_file_is_unreadable_and_names_its_report(tmp_path, damage):
    arrays = random_factors(np.random.default_rng(7))
    db = StateDB(tmp_path / "s.sqlite3")
    saved(ReportStore(db, tmp_path), "bad", arrays, checked=False)
    saved(ReportStore(db, tmp_path), "gone", arrays, checked=False)
    db.execute(IN_ROW + " WHERE job_id = 'bad'", (damage,))
    db.execute(OLDER_RELEASE + " WHERE job_id = 'gone'", ("reports/gone.npz",))
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    with pytest.raises(ReportUnreadable, match="report bad"):
        restarted.result(restarted.get("bad"))
    with pytest.raises(ReportUnreadable, match="report gone"):
        restarted.result(restarted.get("gone"))


def test_a_report_whose_transaction_rolls_back_leaves_no_row_and_is_stored_again(tmp_path):
    """Its row rolls back; its bytes stay in the round's file, named by no row, until the round
    ends; the delivery again stores it after them."""
    arrays = random_factors(np.random.default_rng(4))
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    with pytest.raises(RuntimeError), db.transaction():
        saved(store, "j1", arrays, checked=False)
        raise RuntimeError("the batch failed after the report")
    assert store.get("j1") is None and not (tmp_path / "reports").exists()
    meta = saved(store, "j1", arrays, checked=False)
    assert round_file(tmp_path).stat().st_size == 2 * len(arrays_blob(arrays))
    assert same(store.result(meta).arrays, arrays)


@pytest.mark.parametrize("damage", ["truncated", "removed", "overwritten"])
def test_a_damaged_or_missing_rounds_file_makes_its_reports_unreadable_by_name(tmp_path, damage):
    arrays = random_factors(np.random.default_rng(14))
    db = StateDB(tmp_path / "s.sqlite3")
    saved(ReportStore(db, tmp_path), "j1", arrays, checked=False)
    path = round_file(tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "removed":
        path.unlink()
    else:
        path.write_bytes(b"\x93" * path.stat().st_size)
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    with pytest.raises(ReportUnreadable, match="report j1"):
        restarted.result(restarted.get("j1"))


def test_a_cohort_shape_seen_in_a_transaction_that_rolls_back_is_forgotten_with_it(tmp_path):
    """The cohort's shape is read once and kept; not when the report that set it is gone."""
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    rng = np.random.default_rng(5)
    first = random_factors(rng)
    with pytest.raises(RuntimeError), db.transaction():
        saved(store, "j1", first)
        assert store.cohort_shape("fan") == infer_shape("d", first)
        raise RuntimeError("the batch failed")
    assert store.cohort_shape("fan") is None
    other = {"delta1": np.ones((5, 3), np.float32)}
    saved(store, "j2", other)
    assert store.cohort_shape("fan") == infer_shape("d", other)
    db.execute("DELETE FROM fit_reports")  # kept in memory: not read again
    assert store.cohort_shape("fan") == infer_shape("d", other)


def holding(db: StateDB, state_dir) -> set[str]:
    """The reports whose arrays a restarted store reads back."""
    store = ReportStore(db, state_dir)
    found = set()
    for row in db.query("SELECT job_id FROM fit_reports"):
        try:
            store.result(store.get(row["job_id"]))
        except ReportUnreadable:
            continue
        found.add(row["job_id"])
    return found


def test_release_drops_a_rounds_arrays_from_memory_and_rows_and_keeps_the_rest(tmp_path):
    rng = np.random.default_rng(9)
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    ended = [saved(store, f"e{i}", random_factors(rng), round_id="ended") for i in range(3)]
    open_arrays = random_factors(rng)
    still_open = saved(store, "o1", open_arrays, round_id="open")
    assert store.rounds_holding_arrays() == {"ended", "open"}

    assert store.release("ended") == 3
    assert holding(db, tmp_path) == {"o1"} and store.rounds_holding_arrays() == {"open"}
    assert round_file(tmp_path, "ended") is None and round_file(tmp_path, "open") is not None
    assert [store.get(m.job_id) for m in ended] == ended  # the rows stay
    with pytest.raises(ReportUnreadable, match="e0"):  # neither held nor in its file
        store.result(ended[0])
    assert store.result(still_open).checked_on_receipt  # the open round's, still held
    assert store.release("ended") == 0  # once


def test_a_rounds_file_is_removed_only_when_its_release_commits(tmp_path):
    arrays = random_factors(np.random.default_rng(15))
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    meta = saved(store, "j1", arrays, checked=False)
    with pytest.raises(RuntimeError), db.transaction():
        store.release("r1")
        raise RuntimeError("the round's end rolled back")
    assert same(store.result(meta).arrays, arrays) and store.rounds_holding_arrays() == {"r1"}
    with db.transaction():
        store.release("r1")
        assert round_file(tmp_path) is not None  # not before the commit
    assert round_file(tmp_path) is None and store.rounds_holding_arrays() == set()


def test_an_earlier_versions_file_is_removed_only_when_its_release_commits(tmp_path):
    arrays = random_factors(np.random.default_rng(10))
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    saved(store, "old", arrays, checked=False)
    (tmp_path / "reports").mkdir()
    file = tmp_path / "reports" / "old.npz"
    np.savez(file, **arrays)
    db.execute(OLDER_RELEASE, ("reports/old.npz",))  # as it was
    with pytest.raises(RuntimeError), db.transaction():
        assert store.release("r1") == 1
        raise RuntimeError("the round's end rolled back")
    assert file.exists() and store.get("old").file == "reports/old.npz"
    with db.transaction():
        store.release("r1")
        assert file.exists()  # not before the commit
    assert not file.exists() and store.get("old").file == "" and holding(db, tmp_path) == set()


def test_a_release_removes_no_file_outside_the_state_dirs_report_folder(tmp_path):
    """An earlier version wrote reports/<job>.npz; a row naming anything else (a damaged or
    edited state db) does not make a release delete it."""
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    db = StateDB(tmp_path / "state" / "s.sqlite3")
    store = ReportStore(db, tmp_path / "state")
    saved(store, "odd", random_factors(np.random.default_rng(11)), checked=False)
    db.execute(OLDER_RELEASE, ("../precious.txt",))
    assert store.release("r1") == 1
    assert outside.read_text() == "keep" and holding(db, tmp_path / "state") == set()


def test_a_report_after_its_rounds_release_gets_a_new_file_the_released_rows_never_read(
    tmp_path,
):
    """The late report's bytes land where the released ones were; a released row must not read
    them as its own."""
    rng = np.random.default_rng(16)
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    saved(store, "early", random_factors(rng), checked=False)
    store.release("r1")
    late_arrays = random_factors(rng)
    saved(store, "late", late_arrays, checked=False)
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    with pytest.raises(ReportUnreadable, match=r"report early.*gone"):
        restarted.result(restarted.get("early"))
    assert same(restarted.result(restarted.get("late")).arrays, late_arrays)


@pytest.mark.parametrize(
    "name", ["../s.sqlite3", "/etc/passwd", "7231.0000000g.arrays", "7232.00000000.arrays"]
)
def test_a_row_naming_any_file_but_its_rounds_reads_nothing_and_is_unreadable(tmp_path, name):
    """Another path, a name not of the folder's form, another round's file (r2's: its bytes
    are some other report's)."""
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    saved(store, "j1", random_factors(np.random.default_rng(17)), checked=False)
    saved(store, "j2", random_factors(np.random.default_rng(18)), round_id="r2", checked=False)
    (round_file(tmp_path, "r2")).rename(tmp_path / FOLDER / "7232.00000000.arrays")
    db.execute("UPDATE fit_reports SET arrays_file = ? WHERE job_id = 'j1'", (name,))
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    with pytest.raises(ReportUnreadable, match="is not a file of round r1's arrays"):
        restarted.result(restarted.get("j1"))


@pytest.mark.parametrize(
    ("at", "length"),
    [(None, 100), (0, None), (0, 2**40), (0, 2**62), (-1, 10), (0, 0), (1.5, 10), (0, 2.5),
     (10**6, 10)],
)  # fmt: skip
def test_a_row_whose_offset_or_length_is_damaged_is_unreadable_not_a_crash(tmp_path, at, length):
    """One damaged row fails its device, not every tick: no TypeError, MemoryError or
    OverflowError out of the read, and no read past the file."""
    db = StateDB(tmp_path / "s.sqlite3")
    saved(ReportStore(db, tmp_path), "j1", random_factors(np.random.default_rng(19)), checked=False)
    db.execute("UPDATE fit_reports SET arrays_at = ?, arrays_len = ?", (at, length))
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    with pytest.raises(ReportUnreadable, match=r"report j1.*not a report's arrays"):
        restarted.result(restarted.get("j1"))


def test_a_link_in_the_folder_is_neither_listed_nor_followed(tmp_path):
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    saved(store, "j1", random_factors(np.random.default_rng(20)), checked=False)
    real = round_file(tmp_path)
    outside = tmp_path / "elsewhere.arrays"
    real.rename(outside)
    real.symlink_to(outside)  # the row's name now a link to the same bytes outside the folder
    (tmp_path / FOLDER / "7232.00000000.arrays").symlink_to(outside)  # a round r2 "file"
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    assert restarted.rounds_holding_arrays() == set()
    with pytest.raises(ReportUnreadable, match="report j1"):
        restarted.result(restarted.get("j1"))


def test_a_write_that_fails_is_cut_off_the_file_and_raised_for_the_batch(tmp_path, monkeypatch):
    rng = np.random.default_rng(21)
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    first = saved(store, "j1", random_factors(rng), checked=False)
    size = round_file(tmp_path).stat().st_size
    real_write = os.write

    def disk_full_after_a_page(fd, data):
        if len(data) <= 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:4096]))  # a part of it lands first

    monkeypatch.setattr(round_arrays.os, "write", disk_full_after_a_page)
    with pytest.raises(StorageFailed, match="No space left"):
        saved(store, "j2", random_factors(rng), checked=False)
    assert round_file(tmp_path).stat().st_size == size and store.get("j2") is None
    monkeypatch.undo()
    assert store.result(first) is not None and saved(store, "j2", random_factors(rng))


def test_sync_makes_the_files_written_since_durable_and_keeps_them_if_it_fails(
    tmp_path, monkeypatch
):
    db = StateDB(tmp_path / "s.sqlite3")
    store = ReportStore(db, tmp_path)
    saved(store, "j1", random_factors(np.random.default_rng(22)), checked=False)
    synced: list[int] = []

    def fail(fd):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(round_arrays.os, "fdatasync", fail)
    store.sync_files()  # logged, not raised: the next one tries again
    monkeypatch.setattr(round_arrays.os, "fdatasync", synced.append)
    store.sync_files()
    assert len(synced) == 1  # the file written before the failed sync
    store.sync_files()
    assert len(synced) == 1  # nothing written since
