"""Adapter store: monotonic versions per cohort, lineage, .npz without pickle, base-model hash."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.adapter_store import AdapterStore, AdapterStoreError, BaseModelMismatchError
from coordinator.clock import ManualClock
from coordinator.state_db import StateDB
from tests.coord_helpers import random_deltas

HASH = "ef" * 32
OTHER_HASH = "01" * 32


def open_store(tmp_path) -> AdapterStore:
    return AdapterStore(StateDB.in_dir(tmp_path), tmp_path, clock=ManualClock())


def test_versions_lineage_and_restart(tmp_path):
    rng = np.random.default_rng(3)
    store = open_store(tmp_path)
    v1_arrays = random_deltas(rng)
    v1 = store.save("fan-efef", v1_arrays, base_model_hash=HASH, algorithm="exact-delta")
    v2 = store.save(
        "fan-efef",
        random_deltas(rng),
        base_model_hash=HASH,
        algorithm="exact-delta",
        device_ids=["pi-1", "pi-2"],
        round_id="round-7",
        parent_version=v1.version,
    )
    other = store.save("har-efef", random_deltas(rng), base_model_hash=HASH, algorithm="x")
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert store.current("fan-efef") is None  # saving does not deploy
    store.set_current("fan-efef", 1)

    restarted = open_store(tmp_path)
    assert restarted.current_version("fan-efef") == 1
    loaded = restarted.get("fan-efef", 1)
    assert loaded.meta == v1
    for name, array in v1_arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], array)
    assert [m.version for m in restarted.lineage("fan-efef", 2)] == [2, 1]
    assert restarted.meta("fan-efef", 2).device_ids == ("pi-1", "pi-2")
    assert restarted.meta("fan-efef", 2).round_id == "round-7"
    assert restarted.save("fan-efef", v1_arrays, base_model_hash=HASH, algorithm="a").version == 3


def test_base_model_hash_mismatch_is_refused(tmp_path):
    store = open_store(tmp_path)
    arrays = random_deltas(np.random.default_rng(0))
    store.save("fan-efef", arrays, base_model_hash=HASH, algorithm="exact-delta")
    with pytest.raises(BaseModelMismatchError, match="bound to base model efefefefefef"):
        store.save("fan-efef", arrays, base_model_hash=OTHER_HASH, algorithm="exact-delta")
    with pytest.raises(BaseModelMismatchError, match="not 010101010101"):
        store.get("fan-efef", 1, base_model_hash=OTHER_HASH)
    assert store.get("fan-efef", 1, base_model_hash=HASH).meta.version == 1


def test_unsafe_inputs_and_tampered_files_are_refused(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(AdapterStoreError, match="numeric ndarray"):
        store.save("fan", {"delta1": np.array([object()])}, base_model_hash=HASH, algorithm="a")
    with pytest.raises(AdapterStoreError, match="NaN"):
        store.save("fan", {"delta1": np.array([np.nan])}, base_model_hash=HASH, algorithm="a")
    with pytest.raises(AdapterStoreError, match="cohort"):
        store.save("../etc", {"delta1": np.zeros(2)}, base_model_hash=HASH, algorithm="a")
    with pytest.raises(AdapterStoreError, match="no adapter version 9"):
        store.set_current("fan", 9)
    meta = store.save("fan", {"delta1": np.zeros(2)}, base_model_hash=HASH, algorithm="a")
    (tmp_path / meta.file).write_bytes(b"not the file we wrote")
    with pytest.raises(AdapterStoreError, match="sha256"):
        store.get("fan", meta.version)
