"""HAR windows, the drift split (both rules), per-subject sets, a quick accuracy check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.data import (
    HAR_ACTIVITY_NAMES,
    DataError,
    har_drift_split,
    har_subject_dataset,
    load_har_windows,
)
from agent.data.har_features import n_window_features

ACTIVITY_COUNTS = [1722, 1544, 1407, 1801, 1979, 1958]  # data README, section 2b
DRIFT_POOL = 1762
PRETRAIN = 8649


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


@pytest.fixture(scope="module")
def har_arrays(data_dir) -> dict[str, np.ndarray]:
    return npz_arrays(data_dir / "hapt_windows.npz")


@pytest.fixture(scope="module")
def har_task(data_dir):
    return har_drift_split(data_dir)  # the default: experiment split, standardised


@pytest.fixture(scope="module")
def small_har_dir(tmp_path_factory, har_arrays) -> Path:
    """Every 8th window of the real file (all subjects and recordings): fast split tests."""
    directory = tmp_path_factory.mktemp("small_har")
    write_har(directory, har_arrays, rows=slice(None, None, 8))
    return directory


def write_har(directory: Path, arrays: dict, rows=slice(None), **changes) -> Path:
    per_row = {"X", "y", "subject", "experiment"}
    out = {k: (v[rows] if k in per_row else v) for k, v in arrays.items()}
    out.update(changes)
    np.savez(directory / "hapt_windows.npz", **out)
    return directory


# ---- raw windows --------------------------------------------------------------------------


def test_windows_match_readme(data_dir):
    data = load_har_windows(data_dir)
    assert data.windows.shape == (10411, 128, 6) and data.windows.dtype == np.float32
    assert data.y.dtype == np.int64 and data.subject.dtype == np.int64
    assert np.bincount(data.y).tolist() == ACTIVITY_COUNTS
    assert sorted(set(data.subject.tolist())) == list(range(1, 31))
    assert set(data.experiment.tolist()) == {0, 1, 2}
    windows, y, subject, experiment = data  # unpacks as a 4-tuple
    assert len(windows) == len(y) == len(subject) == len(experiment)


# ---- drift split --------------------------------------------------------------------------


def test_experiment_split_counts_and_no_shared_recording(har_task):
    pretrain, finetune, test = har_task.pretrain, har_task.finetune, har_task.test
    assert len(pretrain) == PRETRAIN and len(finetune) + len(test) == DRIFT_POOL
    for ds in (pretrain, finetune, test):
        assert ds.X.shape == (len(ds), n_window_features()) and ds.X.dtype == np.float32
        assert ds.n_classes == 6 and ds.meta["class_names"] == HAR_ACTIVITY_NAMES
    drift = {9, 14, 16, 19, 25}
    assert not drift & set(pretrain.meta["subject"].tolist())
    assert set(finetune.meta["subject"].tolist()) == set(test.meta["subject"].tolist()) == drift
    recordings = [set(zip(ds.meta["subject"], ds.meta["experiment"], strict=True))
                  for ds in (finetune, test)]  # fmt: skip
    assert not recordings[0] & recordings[1]
    assert (test.meta["experiment"] == 1).all()
    windows = np.concatenate([ds.meta["window"] for ds in (pretrain, finetune, test)])
    assert sorted(windows.tolist()) == list(range(10411))


def test_split_is_standardised_with_pretrain_statistics(har_task):
    scaler = har_task.pretrain.meta["standardizer"]
    assert har_task.test.meta["standardizer"] is scaler
    np.testing.assert_allclose(har_task.pretrain.X.mean(axis=0), 0, atol=1e-3)


def test_random_split_is_seeded_and_sized(small_har_dir):
    a = har_drift_split(small_har_dir, split="random", seed=3, standardize=False)
    b = har_drift_split(small_har_dir, split="random", seed=3, standardize=False)
    c = har_drift_split(small_har_dir, split="random", seed=4, standardize=False)
    pool = len(a.finetune) + len(a.test)
    assert len(a.finetune) == round(0.6 * pool)
    assert a.finetune.meta["window"].tolist() == b.finetune.meta["window"].tolist()
    np.testing.assert_array_equal(a.finetune.X, b.finetune.X)
    assert a.finetune.meta["window"].tolist() != c.finetune.meta["window"].tolist()
    assert not set(a.finetune.meta["window"]) & set(a.test.meta["window"])
    quarter = har_drift_split(small_har_dir, split="random", finetune_fraction=0.25)
    assert len(quarter.finetune) == round(0.25 * pool)


def test_experiment_split_is_deterministic(small_har_dir):
    a = har_drift_split(small_har_dir, seed=0)
    b = har_drift_split(small_har_dir, seed=99)  # the seed plays no part in this rule
    assert a.test.meta["window"].tolist() == b.test.meta["window"].tolist()
    np.testing.assert_array_equal(a.test.X, b.test.X)


def test_experiment_two_goes_to_finetune(small_har_dir):
    task = har_drift_split(small_har_dir, drift_subjects=[10], standardize=False)
    assert set(task.finetune.meta["experiment"].tolist()) == {0, 2}
    assert set(task.test.meta["experiment"].tolist()) == {1}


@pytest.mark.parametrize(
    ("subjects", "message"),
    [
        ((), "empty"),
        ((9, 9), "duplicates"),
        ((0, 9), r"\[0\] out of range"),
        ((31,), "out of range"),
        (tuple(range(1, 31)), "all 30"),
        ((9.0,), "integers"),
        ((True,), "integers"),
    ],
)
def test_bad_drift_subjects(data_dir, subjects, message):
    with pytest.raises(DataError, match=message):
        har_drift_split(data_dir, drift_subjects=subjects)


def test_bad_split_arguments(small_har_dir):
    with pytest.raises(DataError, match="unknown HAR split 'window'"):
        har_drift_split(small_har_dir, split="window")
    with pytest.raises(ValueError, match="finetune_fraction"):
        har_drift_split(small_har_dir, split="random", finetune_fraction=1.0)


# ---- one subject per device ---------------------------------------------------------------


def test_subject_dataset(data_dir, har_task):
    ds = har_subject_dataset(data_dir, 9)
    assert len(ds) == 299 and (ds.meta["subject"] == 9).all()
    scaled = har_subject_dataset(data_dir, 9, standardizer=har_task.pretrain.meta["standardizer"])
    in_task = np.concatenate([har_task.finetune.X, har_task.test.X])
    ids = np.concatenate([har_task.finetune.meta["window"], har_task.test.meta["window"]])
    row_of_window = {window: row for row, window in enumerate(ids.tolist())}
    rows = [row_of_window[window] for window in ds.meta["window"].tolist()]
    np.testing.assert_allclose(scaled.X, in_task[rows], atol=1e-5)  # same features either way


@pytest.mark.parametrize("subject", [0, 31, "9", True])
def test_bad_subject(data_dir, subject):
    with pytest.raises(DataError, match="subject"):
        har_subject_dataset(data_dir, subject)


# ---- a quick check that the features separate the activities ------------------------------


def test_features_classify_unseen_subjects(har_task):
    """Ridge least squares on one-hot targets, trained on 25 subjects, tested on the other 5."""
    train = har_task.pretrain
    X = np.c_[train.X, np.ones(len(train))].astype(np.float64)  # (n, F+1), bias column
    targets = np.eye(6)[train.y]  # (n, 6)
    W = np.linalg.solve(X.T @ X + 1.0 * np.eye(X.shape[1]), X.T @ targets)  # (F+1, 6)
    unseen_X = np.concatenate([har_task.finetune.X, har_task.test.X])
    unseen_y = np.concatenate([har_task.finetune.y, har_task.test.y])
    predicted = np.argmax(np.c_[unseen_X, np.ones(len(unseen_X))] @ W, axis=1)
    accuracy = float((predicted == unseen_y).mean())
    print(f"least-squares accuracy on the 5 unseen drift subjects: {accuracy:.4f}")
    assert accuracy >= 0.85


# ---- error paths --------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"hapt_windows\.npz: file not found"):
        load_har_windows(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {"X": a["X"][:, :, :5]}, r"'X' has shape \(\d+, 128, 5\)"),
        (lambda a: {"X": a["X"].astype(np.int16)}, "expected floating point"),
        (lambda a: {"y": a["y"][:-1]}, r"'y' has shape"),
        (lambda a: {"y": np.where(a["y"] == 5, 6, a["y"])}, r"activity\) out of range 0\.\.5"),
        (lambda a: {"subject": a["subject"] + 30}, r"subject out of range 1\.\.30"),
        (lambda a: {"activity_names": a["activity_names"][::-1]}, "activity_names are"),
        (lambda a: {"sample_rate_hz": np.array(100)}, "sample_rate_hz is 100"),
    ],
)
def test_malformed_har_file(tmp_path, har_arrays, change, message):
    small = {k: (v[:50] if k in ("X", "y", "subject", "experiment") else v)
             for k, v in har_arrays.items()}  # fmt: skip
    write_har(tmp_path, small, **change(small))
    with pytest.raises(DataError, match=message):
        load_har_windows(tmp_path)


def test_nan_window(tmp_path, har_arrays):
    X = har_arrays["X"][:50].copy()
    X[7, 100, 2] = np.nan
    write_har(tmp_path, har_arrays, rows=slice(0, 50), X=X)
    with pytest.raises(
        DataError, match=r"hapt_windows\.npz: X \(windows\) has 1 non-finite.*row 7"
    ):
        load_har_windows(tmp_path)
