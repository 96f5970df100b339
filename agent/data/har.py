"""Human activity recognition from raw smartphone windows (`hapt_windows.npz`).

10,411 windows of 128 samples (2.56 s at 50 Hz) x 6 channels (acc x/y/z in g, gyro x/y/z in
rad/s), 30 subjects, 6 activities, two recordings ("experiments") per subject (subject 10 has a
third). Windows overlap by 50 % inside one recording. Datasets hold `window_features` of the
windows, not the raw samples.

The paper's drift protocol: pre-train on the other subjects, fine-tune and test on the windows of
the drift subjects 9, 14, 16, 19, 25 (1,762 windows here; 8,649 for pre-training).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from agent.data.dataset import Dataset, check_finite, check_in_range, check_labels
from agent.data.errors import DataError
from agent.data.har_features import (
    RAW_CHANNELS,
    SAMPLE_RATE_HZ,
    WINDOW_LENGTH,
    window_feature_names,
    window_features,
)
from agent.data.locate import data_file
from agent.data.npz import KIND_FLOAT, KIND_INT, KIND_STR, read_npz, require_array
from agent.data.scaling import Standardizer

HAR_FILE = "hapt_windows.npz"
HAR_ACTIVITY_NAMES = (
    "WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING",
)  # fmt: skip
HAR_SUBJECTS = tuple(range(1, 31))
HAR_DRIFT_SUBJECTS = (9, 14, 16, 19, 25)
# In the experiment split, the drift subjects' windows of this recording are the test set.
TEST_EXPERIMENT = 1
SPLIT_MODES = ("experiment", "random")


class HarWindows(NamedTuple):
    """All raw windows of the file, row-aligned."""

    windows: np.ndarray  # float32 (n, 128, 6)
    y: np.ndarray  # int64 (n,), activity 0..5 (HAR_ACTIVITY_NAMES)
    subject: np.ndarray  # int64 (n,), 1..30
    experiment: np.ndarray  # int64 (n,), recording of that subject, 0..2


@dataclass(frozen=True)
class HarTask:
    """Pre-train on the non-drift subjects, fine-tune and test on the drift subjects."""

    pretrain: Dataset
    finetune: Dataset
    test: Dataset


def load_har_windows(data_dir: str | os.PathLike[str]) -> HarWindows:
    """The raw windows of `hapt_windows.npz`, checked (shapes, dtypes, finiteness, ranges)."""
    path = data_file(data_dir, HAR_FILE)
    arrays = read_npz(
        path,
        ["X", "y", "subject", "experiment", "activity_names", "channel_names", "sample_rate_hz"],
    )
    windows = require_array(
        arrays, "X", kind=KIND_FLOAT, shape=(None, WINDOW_LENGTH, len(RAW_CHANNELS)), path=path
    )
    n = len(windows)
    y = require_array(arrays, "y", kind=KIND_INT, shape=(n,), path=path)
    subject = require_array(arrays, "subject", kind=KIND_INT, shape=(n,), path=path)
    experiment = require_array(arrays, "experiment", kind=KIND_INT, shape=(n,), path=path)
    _require_names(path, arrays, "activity_names", HAR_ACTIVITY_NAMES)
    _require_names(path, arrays, "channel_names", RAW_CHANNELS)
    rate = require_array(arrays, "sample_rate_hz", kind=KIND_INT, shape=(), path=path)
    if int(rate) != SAMPLE_RATE_HZ:
        # the spectrum bands of window_features are laid out for 50 Hz
        raise DataError(f"{path}: sample_rate_hz is {int(rate)}, expected {SAMPLE_RATE_HZ}")
    check_finite(windows, "X (windows)", source=str(path))
    check_labels(y, len(HAR_ACTIVITY_NAMES), source=str(path), name="y (activity)")
    check_in_range(subject, 1, len(HAR_SUBJECTS), source=str(path), name="subject")
    check_in_range(experiment, 0, 2, source=str(path), name="experiment")
    return HarWindows(
        windows.astype(np.float32, copy=False),
        y.astype(np.int64, copy=False),
        subject.astype(np.int64, copy=False),
        experiment.astype(np.int64, copy=False),
    )


def _require_names(path: Path, arrays: dict[str, np.ndarray], name: str, expected: tuple) -> None:
    names = require_array(arrays, name, kind=KIND_STR, shape=(len(expected),), path=path)
    if tuple(names.tolist()) != expected:
        raise DataError(f"{path}: {name} are {names.tolist()}, expected {list(expected)}")


def har_drift_split(
    data_dir: str | os.PathLike[str],
    drift_subjects: Iterable[int] = HAR_DRIFT_SUBJECTS,
    seed: int = 0,
    finetune_fraction: float = 0.6,
    split: str = "experiment",
    *,
    standardize: bool = True,
) -> HarTask:
    """The drift task: pretrain = every window of the other subjects; the drift subjects' windows
    are divided into finetune and test by one of two rules.

    split="experiment" (default, leakage-free): each drift subject's recording 0 (and 2, which
    only subject 10 has) is fine-tuned on and recording 1 is tested on; no recording is on both
    sides. Windows overlap by 50 %, so a window-level split would put the neighbours (half of the
    samples) of every test window into fine-tuning. `seed` and `finetune_fraction` are unused.
    split="random" (paper-like): a seeded random permutation of the drift pool, the first
    round(finetune_fraction * n) windows to fine-tune, the rest to test (optimistic, see above).

    With standardize=True every split is scaled by the pre-training set's feature mean and spread
    (meta['standardizer'], to be applied unchanged on the devices).
    """
    subjects = validate_drift_subjects(drift_subjects)
    if split not in SPLIT_MODES:
        raise DataError(f"unknown HAR split {split!r}; expected one of {', '.join(SPLIT_MODES)}")
    data = load_har_windows(data_dir)
    source = str(data_file(data_dir, HAR_FILE))
    in_drift = np.isin(data.subject, subjects)  # (n,)
    absent = sorted(set(subjects) - set(data.subject[in_drift].tolist()))
    if absent:
        raise DataError(f"{source}: drift subjects {absent} have no windows")
    if split == "experiment":
        finetune_rows = np.flatnonzero(in_drift & (data.experiment != TEST_EXPERIMENT))
        test_rows = np.flatnonzero(in_drift & (data.experiment == TEST_EXPERIMENT))
    else:
        finetune_rows, test_rows = _random_split(np.flatnonzero(in_drift), finetune_fraction, seed)
    for name, rows in (("finetune", finetune_rows), ("test", test_rows)):
        if len(rows) == 0:
            raise DataError(
                f"{source}: the {split} split of subjects {subjects} leaves {name} empty"
            )
    splits = {
        "pretrain": _features_dataset(data, np.flatnonzero(~in_drift), source, "pretrain"),
        "finetune": _features_dataset(data, finetune_rows, source, f"finetune ({split} split)"),
        "test": _features_dataset(data, test_rows, source, f"test ({split} split)"),
    }
    if standardize:
        standardizer = Standardizer.fit(splits["pretrain"].X)
        splits = {name: standardizer.apply_to(ds) for name, ds in splits.items()}
    return HarTask(**splits)


def _random_split(pool: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"finetune_fraction must be in (0, 1), got {fraction}")
    shuffled = np.random.default_rng(seed).permutation(pool)  # (n_pool,)
    n_finetune = round(fraction * len(pool))
    # sorted: rows stay in file order (subject, recording, time) inside each part
    return np.sort(shuffled[:n_finetune]), np.sort(shuffled[n_finetune:])


def validate_drift_subjects(subjects: Iterable[int]) -> tuple[int, ...]:
    """The drift subjects as a sorted tuple, or `DataError`: ids 1..30, unique, some but not all."""
    given = list(subjects)
    if not given:
        raise DataError("drift_subjects is empty: name at least one subject 1..30")
    if not all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in given):
        raise DataError(f"drift_subjects must be integers 1..30, got {given}")
    out_of_range = [int(s) for s in given if not 1 <= s <= len(HAR_SUBJECTS)]
    if out_of_range:
        raise DataError(f"drift_subjects {out_of_range} out of range 1..30")
    if len(set(given)) != len(given):
        raise DataError(f"drift_subjects has duplicates: {given}")
    if len(given) == len(HAR_SUBJECTS):
        raise DataError("drift_subjects names all 30 subjects: nobody is left to pre-train on")
    return tuple(sorted(int(s) for s in given))


def har_subject_dataset(
    data_dir: str | os.PathLike[str],
    subject: int,
    *,
    standardizer: Standardizer | None = None,
) -> Dataset:
    """All windows of one subject (one device = one person) as features, in recording order.

    Pass the pre-training `standardizer` (e.g. `har_drift_split(...).pretrain.meta
    ['standardizer']`) to scale the features as the model expects.
    """
    if isinstance(subject, bool) or not isinstance(subject, int | np.integer):
        raise DataError(f"HAR subject must be an integer 1..30, got {subject!r}")
    if not 1 <= subject <= len(HAR_SUBJECTS):
        raise DataError(f"HAR subject {subject} out of range 1..30")
    data = load_har_windows(data_dir)
    source = str(data_file(data_dir, HAR_FILE))
    rows = np.flatnonzero(data.subject == subject)  # (n_subject,)
    if len(rows) == 0:
        raise DataError(f"{source}: subject {subject} has no windows")
    dataset = _features_dataset(data, rows, source, f"subject {subject}")
    return standardizer.apply_to(dataset) if standardizer is not None else dataset


def _features_dataset(data: HarWindows, rows: np.ndarray, source: str, part: str) -> Dataset:
    meta = {
        "source": f"{source} [{part}]",
        "split": part,
        "class_names": HAR_ACTIVITY_NAMES,
        "feature_names": window_feature_names(),
        "subject": data.subject[rows],
        "experiment": data.experiment[rows],
        "window": rows,  # row in hapt_windows.npz: identifies a window across splits
    }
    return Dataset(window_features(data.windows[rows]), data.y[rows], len(HAR_ACTIVITY_NAMES), meta)
