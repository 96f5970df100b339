"""The device's own data, as the agent reads it at start: rows, with labels or without.

Device data file (`--data FILE.npz`), readable with `np.load(path, allow_pickle=False)`:

| array         | shape  | dtype              | meaning                                        |
|---------------|--------|--------------------|------------------------------------------------|
| `X`           | (n, d) | float (stored f32) | feature rows, already through the task's       |
|               |        |                    | feature function (e.g. fan_features), d = the  |
|               |        |                    | base model's n_inputs                          |
| `y`           | (n,)   | integer (optional) | labels 0..C-1, C = the base model's n_classes; |
|               |        |                    | without it the device has no labels            |
| `class_names` | (C,)   | str (optional)     | names of the labels                            |
| `X_drift`     | (m, d) | float (optional)   | a simulated device's rows after a drift event  |
| `y_drift`     | (m,)   | integer (optional) | their labels; never without X_drift            |

Rows are in time order (oldest first): the drift scores look at the most recent rows.
A device without labels (`X` alone, `X_drift` alone) still runs: it streams its rows into the
drift scores and its signature, and runs the adapters it is given, but it can neither
fine-tune nor measure accuracy. Each phase (before and after a drift event) is labelled or not
on its own. A directory (`--data DIR`) holds either such a file named `device.npz`, or raw fan
spectra as CSV files in one folder per class (`stop/`, `normal/`, `damaged/`; see
agent.data.fan_csv).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset, check_finite
from agent.data.errors import DataError
from agent.data.fan_csv import load_fan_csv_dir
from agent.data.npz import KIND_FLOAT, KIND_INT, KIND_STR, read_npz, require_array

DEVICE_FILE_IN_DIR = "device.npz"


# eq=False: arrays make `==` ambiguous.
@dataclass(frozen=True, eq=False)
class DeviceRows:
    """One phase of a device's data: its rows in time order and, if it has them, their labels."""

    X: np.ndarray  # float32 (n, d)
    labelled: Dataset | None  # the same rows with labels; None: no labels
    source: str

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def __len__(self) -> int:
        return int(self.X.shape[0])


def load_device_data(path: Path, n_classes: int) -> DeviceRows:
    """The device data at `path` (file or directory, see the module doc); DataError if unusable."""
    if path.is_dir():
        inside = path / DEVICE_FILE_IN_DIR
        if inside.is_file():
            return read_device_file(inside, n_classes)
        recordings = load_fan_csv_dir(path)
        return DeviceRows(recordings.X, recordings, recordings.source)
    if not path.exists():
        raise DataError(f"{path}: device data not found (an .npz with X, and y if labelled)")
    return read_device_file(path, n_classes)


def load_drifted_data(path: Path, n_classes: int, n_features: int) -> DeviceRows | None:
    """The drifted rows (X_drift, y_drift if any) at `path`; None if it has none."""
    file = path / DEVICE_FILE_IN_DIR if path.is_dir() else path
    if not file.is_file():
        return None  # a directory of fan CSV recordings: no drift simulation
    names = _array_names(file)
    if "X_drift" not in names:
        if "y_drift" in names:
            raise DataError(f"{file}: has y_drift without X_drift (the rows it labels)")
        return None
    return _rows(file, "X_drift", "y_drift", n_classes, f"{file} [drift]", n_features)


def read_device_file(path: Path, n_classes: int) -> DeviceRows:
    rows = _rows(path, "X", "y", n_classes, str(path))
    names = _class_names(path, n_classes)
    if names is None or rows.labelled is None:
        return rows
    labelled = Dataset(rows.X, rows.labelled.y, n_classes, {**rows.labelled.meta,
                                                            "class_names": names})  # fmt: skip
    return DeviceRows(rows.X, labelled, rows.source)


def _rows(path: Path, x_name: str, y_name: str, n_classes: int, source: str,
          n_features: int | None = None) -> DeviceRows:  # fmt: skip
    """X (and y, if the file has it) under these names, checked."""
    X = require_array(read_npz(path, [x_name]), x_name, kind=KIND_FLOAT,
                      shape=(None, n_features), path=path).astype(np.float32)  # fmt: skip
    if y_name not in _array_names(path):
        if X.shape[1] < 1:
            raise DataError(f"{source}: {x_name} has no features (shape {X.shape})")
        check_finite(X, x_name, source=source)
        return DeviceRows(X, None, source)
    y = require_array(read_npz(path, [y_name]), y_name, kind=KIND_INT, shape=(X.shape[0],),
                      path=path)  # fmt: skip
    labelled = Dataset(X, y.astype(np.int64), n_classes, {"source": source})
    return DeviceRows(X, labelled, source)


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


def write_device_file(path: Path, dataset: Dataset, drifted: Dataset | None = None, *,
                      labels: bool = True) -> None:  # fmt: skip
    """Write `dataset` (and the rows after a simulated drift) in the device data format;
    `labels=False` writes the rows alone: a device without labels."""
    arrays = {"X": dataset.X.astype(np.float32)}
    if labels:
        arrays["y"] = dataset.y.astype(np.int64)
    names = dataset.meta.get("class_names")
    if names is not None:
        arrays["class_names"] = np.array(names, dtype=str)
    if drifted is not None:
        if drifted.n_features != dataset.n_features:
            raise ValueError(
                f"drifted rows have {drifted.n_features} features, not {dataset.n_features}"
            )
        arrays["X_drift"] = drifted.X.astype(np.float32)
        if labels:
            arrays["y_drift"] = drifted.y.astype(np.int64)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
