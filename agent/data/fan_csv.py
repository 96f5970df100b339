"""Raw cooling-fan recordings as the sensor writes them: one CSV file per spectrum.

File format (matutani/cooling-fan): 512 lines `index, value`, index 0..511 in order, index k is
k Hz (index 0 is the DC bin). Features are bins 1..256, through the same `fan_features` as the
.npz tasks. File names are timestamps (`YYYY-MM-DD-hh-mm-ss.csv`), so name order is time order.

Two directory layouts, chosen by the `label` argument of `load_fan_csv_dir`:

1. One recording, labels from the caller (`label` = an int, or a mapping file stem -> int)::

       recording/2023-01-05-10-00-00.csv, 2023-01-05-10-00-02.csv, ...

   The mapping form labels a recording whose state changes over time (e.g. running, then stopped).

2. Folder per class (`label=None`): one sub-folder per class name, holding CSV files directly or
   in recording sub-folders; a class may have no folder (a device that never saw a stop)::

       data/stop/*.csv
       data/normal/rec1/*.csv
       data/damaged/rec3/*.csv
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset
from agent.data.errors import DataError
from agent.data.fan import FAN_CLASS_NAMES, FAN_N_FEATURES, check_spectra, fan_features

FAN_CSV_LINES = 512


def read_fan_csv(path: str | os.PathLike[str]) -> np.ndarray:
    """float32 (256,): the raw spectrum 1..256 Hz of one CSV file (512 lines `index, value`)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # an empty file is reported below as a wrong line count, not as a NumPy warning
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)  # (512, 2)
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from error
    except ValueError as error:
        raise DataError(
            f"{path}: malformed CSV, expected lines 'index, value' ({error})"
        ) from error
    if table.shape != (FAN_CSV_LINES, 2):
        raise DataError(
            f"{path}: {table.shape[0]} lines of {table.shape[1]} fields, expected "
            f"{FAN_CSV_LINES} lines 'index, value' (index 0..{FAN_CSV_LINES - 1})"
        )
    wrong_index = np.flatnonzero(table[:, 0] != np.arange(FAN_CSV_LINES))
    if len(wrong_index):
        line = int(wrong_index[0])
        raise DataError(
            f"{path}: line {line + 1} has index {table[line, 0]:g}, expected {line} "
            "(indices must run 0..511 in order, index k = k Hz)"
        )
    spectrum = table[1 : FAN_N_FEATURES + 1, 1].astype(np.float32)  # (256,)
    check_spectra(spectrum[None, :], "spectrum", source=str(path))
    return spectrum


def load_fan_csv_dir(
    path: str | os.PathLike[str],
    label: int | Mapping[str, int] | None = None,
    *,
    class_names: Sequence[str] = FAN_CLASS_NAMES,
) -> Dataset:
    """A Dataset of fan_features from a directory of CSV spectra (layouts in the module doc).

    label: an int for every file of a one-recording folder; a mapping from file stem (the
    timestamp) to label for a recording whose state changes; None for the folder-per-class
    layout, where a sub-folder named class_names[k] holds the files of label k.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory of fan CSV files")
    if label is None:
        files, labels = _class_folder_files(root, tuple(class_names))
    else:
        files = sorted(root.glob("*.csv"))
        if not files:
            raise DataError(f"{root}: no .csv files (one CSV per spectrum expected)")
        labels = _caller_labels(root, files, label)
    spectra = np.stack([read_fan_csv(file) for file in files])  # (n, 256)
    y = np.array(labels, dtype=np.int64)  # (n,)
    meta = {
        "source": str(root),
        "class_names": tuple(class_names),
        "file": np.array([str(file.relative_to(root)) for file in files]),
        "timestamp": np.array([file.stem for file in files]),
    }
    return Dataset(fan_features(spectra), y, len(class_names), meta)


def _caller_labels(root: Path, files: list[Path], label: int | Mapping[str, int]) -> list[int]:
    if not isinstance(label, Mapping):
        return [int(label)] * len(files)
    stems = [file.stem for file in files]
    unlabelled = [stem for stem in stems if stem not in label]
    if unlabelled:
        raise DataError(
            f"{root}: {len(unlabelled)} CSV files have no label, e.g. {unlabelled[:3]} "
            "(the label mapping is keyed by file name without .csv)"
        )
    unknown = sorted(set(label) - set(stems))
    if unknown:
        raise DataError(f"{root}: labels given for files that do not exist, e.g. {unknown[:3]}")
    return [int(label[stem]) for stem in stems]


def _class_folder_files(root: Path, class_names: tuple[str, ...]) -> tuple[list[Path], list[int]]:
    stray_csv = sorted(root.glob("*.csv"))
    if stray_csv:
        raise DataError(
            f"{root}: CSV files directly in the folder ({stray_csv[0].name}, ...): with label=None "
            f"they must sit in class folders {', '.join(class_names)}; or pass label="
        )
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise DataError(
            f"{root}: folders {unknown} are not class names; expected folders named "
            f"{', '.join(class_names)} (label k = position in that list)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_files = sorted((root / name).rglob("*.csv")) if (root / name).is_dir() else []
        files += class_files
        labels += [label] * len(class_files)
    if not files:
        raise DataError(f"{root}: no .csv files in the class folders {', '.join(class_names)}")
    return files, labels
