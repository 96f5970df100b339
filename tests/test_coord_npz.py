"""coordinator.npz writes what np.load reads back exactly, and what zipfile checks clean."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from coordinator.npz import npz_bytes


def test_np_load_reads_back_every_array_with_its_dtype_and_shape():
    rng = np.random.default_rng(0)
    arrays = {
        "A0": rng.normal(size=(185, 4)).astype(np.float32),
        "B0": rng.normal(size=(4, 96)).astype(np.float32),
        "scalar": np.array(3.5),
        "ints": np.arange(7, dtype=np.int64),
        "fortran": np.asfortranarray(rng.normal(size=(3, 5))),
        "big_endian": np.arange(4, dtype=">f8"),
        "empty": np.zeros((0, 3), np.float32),
    }
    data = npz_bytes(arrays)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every member's CRC holds
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for name, array in arrays.items():
            assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
            np.testing.assert_array_equal(loaded[name], array)


def test_an_object_array_is_refused():
    with pytest.raises(ValueError, match="pickle"):
        npz_bytes({"x": np.array([{}], dtype=object)})
