"""Cooling-fan vibration spectra: the Damage1 / Damage2 tasks (`fan_damage{1,2}.npz`).

A sample is one vibration spectrum, 1..256 Hz (index k = k Hz), raw magnitudes in [0, 1).
Every fan loader (these task files, the fleet file, raw CSV recordings) turns spectra into
features with the same `fan_features`, so a model pre-trained on one source works on the others.
Labels are the paper's 3 classes: 0 stop, 1 normal fan running, 2 damaged fan running.

Splits (see the data README): pretrain = silent room (silentA_1 recordings of the normal and the
damaged fan), finetune = noisy room recordings _1, test = noisy room recordings _2, 470 each;
silent_all = all 8 silent recordings (1880), for other pre-training choices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset, check_finite, check_labels
from agent.data.errors import DataError
from agent.data.locate import data_file
from agent.data.npz import (
    KIND_BOOL,
    KIND_FLOAT,
    KIND_INT,
    KIND_STR,
    read_npz,
    require_array,
    require_same_length,
)

FAN_CLASS_NAMES = ("stop", "normal", "damaged")
FAN_N_FEATURES = 256  # spectrum bins 1..256 Hz
# Added before the log: spectra of a stopped fan in a quiet room reach 0 in many bins.
FAN_LOG_EPS = 1e-3
FAN_TASKS = ("damage1", "damage2")
FAN_SPLITS = ("pretrain", "finetune", "test", "silent_all")
FAN_SPEED_NAMES = ("h", "m", "l", "o")  # o = 0 rpm, i.e. the stop class
FAN_SPEED_STOPPED = 3


def fan_features(spectra: np.ndarray) -> np.ndarray:
    """float32 (n, 256) raw spectra -> float32 (n, 256) features log(x + 1e-3).

    The log turns the multiplicative differences between speeds, fans and rooms into additive
    ones and compresses the few large harmonic peaks; the eps keeps empty bins finite.
    """
    spectra = np.asarray(spectra, dtype=np.float32)  # (n, 256)
    return np.log(spectra + np.float32(FAN_LOG_EPS))  # (n, 256)


def check_spectra(spectra: np.ndarray, name: str, *, source: str) -> None:
    """Raw spectra must be finite magnitudes (>= 0): a negative one would turn the log into NaN."""
    check_finite(spectra, name, source=source)
    negative_rows = np.flatnonzero((spectra < 0).any(axis=1))
    if len(negative_rows):
        raise DataError(
            f"{source}: {name} has negative magnitudes in {len(negative_rows)} spectra, "
            f"first in row {int(negative_rows[0])}"
        )


@dataclass(frozen=True)
class FanTask:
    """The paper's three splits of one fan task; each is a Dataset of fan_features."""

    pretrain: Dataset
    finetune: Dataset
    test: Dataset


def load_fan_task(data_dir: str | os.PathLike[str], task: str) -> FanTask:
    """Damage1 or Damage2 ("damage1" | "damage2") from `fan_damage1.npz` / `fan_damage2.npz`."""
    path = _task_file(data_dir, task)
    splits = {name: _read_fan_split(path, task, name) for name in ("pretrain", "finetune", "test")}
    return FanTask(**splits)


def load_fan_split(data_dir: str | os.PathLike[str], task: str, split: str) -> Dataset:
    """One split ("pretrain" | "finetune" | "test" | "silent_all") of a fan task."""
    if split not in FAN_SPLITS:
        raise DataError(f"unknown fan split {split!r}; expected one of {', '.join(FAN_SPLITS)}")
    return _read_fan_split(_task_file(data_dir, task), task, split)


def _task_file(data_dir: str | os.PathLike[str], task: str) -> Path:
    if task not in FAN_TASKS:
        raise DataError(f"unknown fan task {task!r}; expected one of {', '.join(FAN_TASKS)}")
    return data_file(data_dir, f"fan_{task}.npz")


def _read_fan_split(path: Path, task: str, split: str) -> Dataset:
    per_row = ["X", "y", "speed", "transition", "rec", "tindex", "timestamp"]
    arrays = read_npz(path, [f"{key}_{split}" for key in per_row] + ["rec_names", "class_names"])
    spectra = require_array(
        arrays, f"X_{split}", kind=KIND_FLOAT, shape=(None, FAN_N_FEATURES), path=path
    )
    y = require_array(arrays, f"y_{split}", kind=KIND_INT, shape=(None,), path=path)
    speed = require_array(arrays, f"speed_{split}", kind=KIND_INT, shape=(None,), path=path)
    transition = require_array(
        arrays, f"transition_{split}", kind=KIND_BOOL, shape=(None,), path=path
    )
    rec = require_array(arrays, f"rec_{split}", kind=KIND_INT, shape=(None,), path=path)
    tindex = require_array(arrays, f"tindex_{split}", kind=KIND_INT, shape=(None,), path=path)
    timestamp = require_array(arrays, f"timestamp_{split}", kind=KIND_STR, shape=(None,), path=path)
    rec_names = require_array(arrays, "rec_names", kind=KIND_STR, shape=(None,), path=path)
    class_names = require_array(arrays, "class_names", kind=KIND_STR, shape=(None,), path=path)
    require_same_length(
        path, X=spectra, y=y, speed=speed, transition=transition, rec=rec, tindex=tindex,
        timestamp=timestamp,
    )  # fmt: skip
    if tuple(class_names.tolist()) != FAN_CLASS_NAMES:
        raise DataError(
            f"{path}: class_names are {class_names.tolist()}, expected {list(FAN_CLASS_NAMES)}"
        )
    source = f"{path} [{split}]"
    check_spectra(spectra, f"X_{split}", source=source)
    check_labels(speed, len(FAN_SPEED_NAMES), source=source, name=f"speed_{split}")
    check_labels(rec, len(rec_names), source=source, name=f"rec_{split} (recording index)")
    meta = {
        "source": source,
        "task": task,
        "split": split,
        "class_names": FAN_CLASS_NAMES,
        "speed": speed.astype(np.int64),
        "transition": transition,
        "recording": rec_names[rec],
        "tindex": tindex.astype(np.int64),
        "timestamp": timestamp,
    }
    return Dataset(fan_features(spectra), y.astype(np.int64), len(FAN_CLASS_NAMES), meta)
