"""The persisted adapter: install, keep the previous for rollback and the device's personal
adapter across fleet installs, refuse other base models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.adapter_store import AdapterSource, AdapterStore, BaseModelMismatch, NothingToRollBack
from shared.protocol.enums import AdapterOrigin


def arrays(value: float) -> dict[str, np.ndarray]:
    return {"delta3": np.full((4, 3), value, dtype=np.float32)}


def test_empty_store_runs_no_adapter(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    assert store.current is None and store.previous is None
    with pytest.raises(NothingToRollBack):
        store.rollback()


def test_install_keeps_the_previous_and_survives_a_restart(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    store.install(arrays(1), version=1, base_model_hash="h1", source=AdapterSource.COORDINATOR)
    store.install(
        arrays(2),
        version=None,
        base_model_hash="h1",
        source=AdapterSource.FINETUNE,
        details={"job_id": "j7"},
    )
    reopened = AdapterStore(tmp_path, "h1")
    assert reopened.current.meta.source is AdapterSource.FINETUNE
    assert reopened.current.meta.details == {"job_id": "j7"}
    np.testing.assert_array_equal(reopened.current.arrays["delta3"], arrays(2)["delta3"])
    assert reopened.previous.meta.version == 1
    assert reopened.find(1) is not None and reopened.find(5) is None


def test_only_the_named_slots_are_kept_on_disk(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    for version in range(4):
        store.install(
            arrays(version), version=version, base_model_hash="h1", source=AdapterSource.COORDINATOR
        )
    assert len(list((tmp_path / "slots").iterdir())) == 2
    pointer = json.loads((tmp_path / "pointer.json").read_text())
    assert set(pointer) == {"current", "previous", "personal"} and pointer["personal"] is None


def test_rollback_swaps_and_a_second_rollback_undoes_it(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    store.install(arrays(1), version=1, base_model_hash="h1", source=AdapterSource.COORDINATOR)
    store.install(arrays(2), version=2, base_model_hash="h1", source=AdapterSource.COORDINATOR)
    assert store.rollback().meta.version == 1
    assert AdapterStore(tmp_path, "h1").current.meta.version == 1
    assert store.rollback().meta.version == 2


def test_adapter_for_another_base_model_is_refused(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    with pytest.raises(BaseModelMismatch):
        store.install(arrays(1), version=1, base_model_hash="h2", source=AdapterSource.COORDINATOR)
    assert store.current is None


def test_adapters_of_an_old_base_model_are_not_run_after_a_model_change(tmp_path):
    AdapterStore(tmp_path, "old").install(
        arrays(1), version=1, base_model_hash="old", source=AdapterSource.COORDINATOR
    )
    assert AdapterStore(tmp_path, "new").current is None


def test_files_load_without_pickle(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    store.install(arrays(3), version=3, base_model_hash="h1", source=AdapterSource.COORDINATOR)
    (slot,) = (tmp_path / "slots").iterdir()
    with np.load(slot / "adapter.npz", allow_pickle=False) as npz:
        assert npz["delta3"].dtype == np.float32


def test_clear_runs_the_base_model_alone_and_keeps_the_adapter_for_rollback(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    assert store.clear() is None  # nothing running: nothing to do
    store.install(arrays(1), version=1, base_model_hash="h1", source=AdapterSource.COORDINATOR)
    assert store.clear().meta.version == 1
    reopened = AdapterStore(tmp_path, "h1")
    assert reopened.current is None and reopened.previous.meta.version == 1
    assert reopened.find(1) is not None
    assert reopened.rollback().meta.version == 1


def install(store, value, version, source):
    return store.install(arrays(value), version=version, base_model_hash="h1", source=source)


def test_the_personal_adapter_survives_fleet_installs_and_a_restart(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    mine = install(store, 1, None, AdapterSource.FINETUNE)
    assert store.personal.slot == mine.slot and store.origin is AdapterOrigin.PERSONAL
    for version in (5, 6, 7):  # current and previous move on; the personal slot stays
        install(store, version, version, AdapterSource.COORDINATOR)
    reopened = AdapterStore(tmp_path, "h1")
    assert reopened.current.meta.version == 7 and reopened.previous.meta.version == 6
    assert reopened.personal.slot == mine.slot
    np.testing.assert_array_equal(reopened.personal.arrays["delta3"], arrays(1)["delta3"])
    assert reopened.origin is AdapterOrigin.FLEET
    assert len(list((tmp_path / "slots").iterdir())) == 3  # current, previous, personal


def test_a_new_finetune_replaces_the_personal_adapter(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    install(store, 1, None, AdapterSource.FINETUNE)
    newer = install(store, 2, None, AdapterSource.FINETUNE)
    assert store.personal.slot == newer.slot
    assert store.previous.meta.source is AdapterSource.FINETUNE  # the older one, for rollback


def test_origin_follows_rollback_and_clear(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    assert store.origin is AdapterOrigin.BASE
    install(store, 1, None, AdapterSource.FINETUNE)
    install(store, 2, 2, AdapterSource.COORDINATOR)
    assert store.origin is AdapterOrigin.FLEET
    store.rollback()
    assert store.origin is AdapterOrigin.PERSONAL
    store.clear()
    assert store.origin is AdapterOrigin.BASE and store.personal is not None


def test_a_store_written_before_personal_slots_opens(tmp_path):
    store = AdapterStore(tmp_path, "h1")
    installed = install(store, 1, 1, AdapterSource.COORDINATOR)
    (tmp_path / "pointer.json").write_text(json.dumps({"current": installed.slot,
                                                       "previous": None}))  # fmt: skip
    reopened = AdapterStore(tmp_path, "h1")
    assert reopened.current.meta.version == 1 and reopened.personal is None


def test_a_base_model_change_drops_the_personal_adapter_too(tmp_path):
    install(AdapterStore(tmp_path, "h1"), 1, None, AdapterSource.FINETUNE)
    assert AdapterStore(tmp_path, "h2").personal is None
