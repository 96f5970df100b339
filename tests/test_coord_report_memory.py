"""Report arrays held in memory until their round reads them; the files stay the durable copy."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator import reports
from coordinator.reports import ReportMeta, ReportStore, infer_shape
from coordinator.state_db import StateDB
from tests.coord_helpers import random_factors


def saved(store: ReportStore, job_id: str, arrays: dict, round_id: str | None = "r1") -> ReportMeta:
    meta = ReportMeta(
        job_id=job_id, device_id=f"dev-{job_id}", round_id=round_id, cohort="fan",
        base_model_hash="h", samples=10, shape=infer_shape("d", arrays),
        parent_adapter_version=None, received_at=1.0, file=ReportStore.file_for(job_id),
    )  # fmt: skip
    store.save(meta, arrays)
    return meta


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_report_is_read_from_memory_once_then_from_its_file(tmp_path):
    arrays = random_factors(np.random.default_rng(0))
    store = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    meta = saved(store, "j1", arrays)
    (tmp_path / meta.file).write_bytes(b"")  # the held copy answers: the file is not read
    first = store.arrays(meta)
    assert same(first, arrays) and all(a.flags.writeable for a in first.values())
    with pytest.raises(EOFError):  # taken out by the first read: the emptied file is read
        store.arrays(meta)


def test_a_restarted_store_and_one_past_its_cap_read_the_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    store = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    one, two = random_factors(rng), random_factors(rng)
    monkeypatch.setattr(reports, "MEMORY_CAP_BYTES", sum(a.nbytes for a in one.values()))
    m1, m2 = saved(store, "j1", one), saved(store, "j2", two)  # j1 leaves memory for j2
    (tmp_path / m2.file).unlink()
    assert same(store.arrays(m1), one) and same(store.arrays(m2), two)
    restarted = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    assert same(restarted.arrays(m1), one)


def test_a_report_outside_any_round_is_not_held_in_memory(tmp_path):
    """Nothing aggregates a device's own fine-tune: holding it only filled memory up to the cap."""
    arrays = random_factors(np.random.default_rng(2))
    store = ReportStore(StateDB(tmp_path / "s.sqlite3"), tmp_path)
    meta = saved(store, "own", arrays, round_id=None)
    (tmp_path / meta.file).write_bytes(b"")  # no held copy: the (emptied) file is what is read
    with pytest.raises(EOFError):
        store.arrays(meta)
