"""The device's own labelled data, as the agent reads it at start.

Device data file (`--data FILE.npz`), readable with `np.load(path, allow_pickle=False)`:

| array         | shape  | dtype              | meaning                                        |
|---------------|--------|--------------------|------------------------------------------------|
| `X`           | (n, d) | float (stored f32) | feature rows, already through the task's       |
|               |        |                    | feature function (e.g. fan_features), d = the  |
|               |        |                    | base model's n_inputs                          |
| `y`           | (n,)   | integer            | labels 0..C-1, C = the base model's n_classes  |
| `class_names` | (C,)   | str (optional)     | names of the labels                            |
| `X_drift`     | (m, d) | float (optional)   | a simulated device's rows after a drift event  |
| `y_drift`     | (m,)   | integer (optional) | their labels; X_drift and y_drift go together  |

Rows are in time order (oldest first): the drift score looks at the most recent rows.
A directory (`--data DIR`) holds either such a file named `device.npz`, or raw fan spectra as
CSV files in one folder per class (`stop/`, `normal/`, `damaged/`; see agent.data.fan_csv).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset
from agent.data.errors import DataError
from agent.data.fan_csv import load_fan_csv_dir
from agent.data.npz import KIND_FLOAT, KIND_INT, KIND_STR, read_npz, require_array

DEVICE_FILE_IN_DIR = "device.npz"
DRIFT_ARRAYS = ("X_drift", "y_drift")


def load_device_data(path: Path, n_classes: int) -> Dataset:
    """The device data at `path` (file or directory, see the module doc); DataError if unusable."""
    if path.is_dir():
        inside = path / DEVICE_FILE_IN_DIR
        return read_device_file(inside, n_classes) if inside.is_file() else load_fan_csv_dir(path)
    if not path.exists():
        raise DataError(f"{path}: device data not found (an .npz with X and y, or a directory)")
    return read_device_file(path, n_classes)


def load_drifted_data(path: Path, n_classes: int, n_features: int) -> Dataset | None:
    """The drifted rows (X_drift, y_drift) of the device data at `path`; None if it has none."""
    file = path / DEVICE_FILE_IN_DIR if path.is_dir() else path
    if not file.is_file():
        return None  # a directory of fan CSV recordings: no drift simulation
    present = [name for name in DRIFT_ARRAYS if name in _array_names(file)]
    if not present:
        return None
    if len(present) == 1:
        raise DataError(f"{file}: has {present[0]} without its partner (X_drift and y_drift)")
    arrays = read_npz(file, DRIFT_ARRAYS)
    X = require_array(arrays, "X_drift", kind=KIND_FLOAT, shape=(None, n_features), path=file)
    y = require_array(arrays, "y_drift", kind=KIND_INT, shape=(X.shape[0],), path=file)
    meta = {"source": f"{file} [drift]"}
    return Dataset(X.astype(np.float32), y.astype(np.int64), n_classes, meta)


def read_device_file(path: Path, n_classes: int) -> Dataset:
    arrays = read_npz(path, ["X", "y"])
    X = require_array(arrays, "X", kind=KIND_FLOAT, shape=(None, None), path=path)
    y = require_array(arrays, "y", kind=KIND_INT, shape=(X.shape[0],), path=path)
    meta: dict = {"source": str(path)}
    names = _class_names(path, n_classes)
    if names is not None:
        meta["class_names"] = names
    return Dataset(X.astype(np.float32), y.astype(np.int64), n_classes, meta)


def _array_names(path: Path) -> set[str]:
    read_npz(path, [])  # a clear DataError for an unreadable archive
    with np.load(path, allow_pickle=False) as archive:
        return set(archive.files)


def _class_names(path: Path, n_classes: int) -> tuple[str, ...] | None:
    if "class_names" not in _array_names(path):
        return None
    names = require_array(
        read_npz(path, ["class_names"]), "class_names", kind=KIND_STR, shape=(n_classes,), path=path
    )
    return tuple(str(n) for n in names)


def write_device_file(path: Path, dataset: Dataset, drifted: Dataset | None = None) -> None:
    """Write `dataset` (and the rows after a simulated drift) in the device data format."""
    arrays = {"X": dataset.X.astype(np.float32), "y": dataset.y.astype(np.int64)}
    names = dataset.meta.get("class_names")
    if names is not None:
        arrays["class_names"] = np.array(names, dtype=str)
    if drifted is not None:
        if drifted.n_features != dataset.n_features:
            raise ValueError(
                f"drifted rows have {drifted.n_features} features, not {dataset.n_features}"
            )
        arrays["X_drift"] = drifted.X.astype(np.float32)
        arrays["y_drift"] = drifted.y.astype(np.int64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
