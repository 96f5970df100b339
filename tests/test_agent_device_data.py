"""The device data file: X (and y, when labelled) in an .npz, clear DataErrors when it is not."""

from __future__ import annotations

import numpy as np
import pytest

from agent.data.dataset import Dataset
from agent.data.errors import DataError
from agent.device_data import load_device_data, load_drifted_data, write_device_file


def test_round_trip_with_class_names(tmp_path):
    data = Dataset(
        np.ones((4, 2), np.float32), np.array([0, 1, 2, 0]), 3, {"class_names": ("a", "b", "c")}
    )
    write_device_file(tmp_path / "device.npz", data)
    loaded = load_device_data(tmp_path, n_classes=3)  # a directory holding device.npz
    np.testing.assert_array_equal(loaded.X, data.X)
    assert loaded.labelled.meta["class_names"] == ("a", "b", "c")
    assert loaded.labelled.y.dtype == np.int64


def test_float64_features_are_accepted_as_float32(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((3, 2)), y=np.array([0, 1, 1], dtype=np.int32))
    loaded = load_device_data(tmp_path / "d.npz", n_classes=2)
    assert loaded.X.dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros(3, np.int64)}, "missing array"),
        ({"X": np.zeros(3, np.float32), "y": np.zeros(3, np.int64)}, "shape"),
        ({"X": np.full((3, 2), np.inf, np.float32)}, "non-finite"),
        ({"X": np.zeros((3, 2), np.float32), "y": np.array([0, 1, 5])}, "out of range"),
        ({"X": np.full((3, 2), np.nan, np.float32), "y": np.zeros(3, np.int64)}, "non-finite"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as caught:
        load_device_data(tmp_path / "bad.npz", n_classes=3)
    assert "bad.npz" in str(caught.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_device_data(tmp_path / "nope.npz", n_classes=3)


def _rows(n, d=2, classes=3, start=0.0):
    X = (start + np.arange(n * d, dtype=np.float32)).reshape(n, d)
    return Dataset(X, np.arange(n, dtype=np.int64) % classes, classes)


def test_drifted_rows_round_trip_beside_the_normal_ones(tmp_path):
    write_device_file(tmp_path / "d.npz", _rows(6), drifted=_rows(4, start=100.0))
    normal = load_device_data(tmp_path / "d.npz", n_classes=3)
    drifted = load_drifted_data(tmp_path / "d.npz", n_classes=3, n_features=2)
    assert len(normal) == 6 and normal.X[0, 0] == 0.0
    assert len(drifted) == 4 and drifted.X[0, 0] == 100.0
    assert drifted.X.dtype == np.float32 and drifted.labelled.y.dtype == np.int64
    assert "[drift]" in drifted.source


def test_without_drifted_rows_there_is_no_drift_data(tmp_path):
    write_device_file(tmp_path / "device.npz", _rows(6))
    assert load_drifted_data(tmp_path, n_classes=3, n_features=2) is None  # the directory form
    (tmp_path / "recordings" / "normal").mkdir(parents=True)  # fan CSV folders, no .npz
    assert load_drifted_data(tmp_path / "recordings", n_classes=3, n_features=2) is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y_drift": np.zeros(3, np.int64)}, "without X_drift"),
        ({"X_drift": np.zeros((3, 5), np.float32), "y_drift": np.zeros(3, np.int64)}, "shape"),
        ({"X_drift": np.zeros((3, 2), np.float32), "y_drift": np.array([0, 1, 7])}, "range"),
        ({"X_drift": np.zeros((3, 2), np.float32), "y_drift": np.zeros(2, np.int64)}, "shape"),
    ],
)
def test_bad_drifted_rows_raise_data_error_naming_the_file(tmp_path, arrays, message):
    np.savez(
        tmp_path / "bad.npz", X=np.zeros((3, 2), np.float32), y=np.zeros(3, np.int64), **arrays
    )
    with pytest.raises(DataError, match=message) as caught:
        load_drifted_data(tmp_path / "bad.npz", n_classes=3, n_features=2)
    assert "bad.npz" in str(caught.value)


def test_writing_drifted_rows_of_another_width_is_refused(tmp_path):
    with pytest.raises(ValueError, match="features"):
        write_device_file(tmp_path / "d.npz", _rows(4), drifted=_rows(4, d=3))


def test_a_file_without_labels_is_a_device_without_labels(tmp_path):
    write_device_file(tmp_path / "d.npz", _rows(6), drifted=_rows(4, start=100.0), labels=False)
    with np.load(tmp_path / "d.npz") as archive:
        assert set(archive.files) == {"X", "X_drift"}
    normal = load_device_data(tmp_path / "d.npz", n_classes=3)
    drifted = load_drifted_data(tmp_path / "d.npz", n_classes=3, n_features=2)
    assert normal.labelled is None and len(normal) == 6
    assert drifted.labelled is None and drifted.X[0, 0] == 100.0


def test_labels_before_a_drift_event_and_none_after_it(tmp_path):
    np.savez(tmp_path / "d.npz", X=_rows(6).X, y=_rows(6).y, X_drift=_rows(4, start=9.0).X)
    assert load_device_data(tmp_path / "d.npz", n_classes=3).labelled is not None
    assert load_drifted_data(tmp_path / "d.npz", n_classes=3, n_features=2).labelled is None
