"""The device data file: X and y in an .npz, clear DataErrors when it is not."""

from __future__ import annotations

import numpy as np
import pytest

from agent.data.dataset import Dataset
from agent.data.errors import DataError
from agent.device_data import load_device_data, write_device_file


def test_round_trip_with_class_names(tmp_path):
    data = Dataset(
        np.ones((4, 2), np.float32), np.array([0, 1, 2, 0]), 3, {"class_names": ("a", "b", "c")}
    )
    write_device_file(tmp_path / "device.npz", data)
    loaded = load_device_data(tmp_path, n_classes=3)  # a directory holding device.npz
    np.testing.assert_array_equal(loaded.X, data.X)
    assert loaded.meta["class_names"] == ("a", "b", "c")
    assert loaded.y.dtype == np.int64


def test_float64_features_are_accepted_as_float32(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((3, 2)), y=np.array([0, 1, 1], dtype=np.int32))
    loaded = load_device_data(tmp_path / "d.npz", n_classes=2)
    assert loaded.X.dtype == np.float32


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((3, 2), np.float32)}, "missing array"),
        ({"X": np.zeros(3, np.float32), "y": np.zeros(3, np.int64)}, "shape"),
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
