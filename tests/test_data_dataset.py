"""Dataset validation, hold-out split, data-directory resolution, standardisation."""

from __future__ import annotations

import numpy as np
import pytest

from agent.data import DATA_DIR_ENV, DataError, Dataset, holdout_split, resolve_data_dir
from agent.data.locate import DATA_FILES, data_file
from agent.data.scaling import Standardizer


def make_dataset(n: int = 40, d: int = 5, n_classes: int = 3, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = np.arange(n, dtype=np.int64) % n_classes
    return Dataset(X, y, n_classes, {"source": "unit", "row_id": np.arange(n), "name": "toy"})


# ---- Dataset validation -------------------------------------------------------------------


def test_valid_dataset_basics():
    ds = make_dataset()
    assert len(ds) == 40 and ds.n_features == 5
    assert ds.class_counts().tolist() == [14, 13, 13]


@pytest.mark.parametrize(
    ("X", "y", "n_classes", "message"),
    [
        (np.zeros((4, 2), np.float64), np.zeros(4, np.int64), 2, "float32"),
        (np.zeros(4, np.float32), np.zeros(4, np.int64), 2, r"shape \(n, d\)"),
        (np.zeros((4, 0), np.float32), np.zeros(4, np.int64), 2, r"shape \(n, d\)"),
        (np.zeros((4, 2), np.float32), np.zeros(4, np.int32), 2, "int64"),
        (np.zeros((4, 2), np.float32), np.zeros(3, np.int64), 2, "match X"),
        (np.zeros((4, 2), np.float32), np.zeros(4, np.int64), 1, "n_classes"),
        (np.zeros((4, 2), np.float32), np.zeros(4, np.int64), True, "n_classes"),
        (np.zeros((4, 2), np.float32), np.array([0, 1, 2, 1]), 2, "out of range 0..1"),
        (np.zeros((4, 2), np.float32), np.array([0, -1, 0, 1]), 2, "out of range"),
    ],
)
def test_invalid_dataset_is_rejected(X, y, n_classes, message):
    with pytest.raises(DataError, match=message):
        Dataset(X, y, n_classes, {"source": "my.npz"})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_rejected_with_row(bad):
    X = np.zeros((5, 3), np.float32)
    X[3, 1] = bad
    with pytest.raises(DataError, match=r"my\.npz: X has 1 non-finite .* row 3"):
        Dataset(X, np.zeros(5, np.int64), 2, {"source": "my.npz"})


def test_meta_arrays_must_be_per_row():
    with pytest.raises(DataError, match="meta\\['subject'\\]"):
        Dataset(np.zeros((4, 2), np.float32), np.zeros(4, np.int64), 2, {"subject": np.arange(3)})


def test_subset_slices_per_row_meta_and_keeps_the_rest():
    ds = make_dataset()
    part = ds.subset(np.array([3, 1]))
    assert part.meta["row_id"].tolist() == [3, 1]
    assert part.meta["name"] == "toy" and part.meta["source"] == "unit"
    np.testing.assert_array_equal(part.X, ds.X[[3, 1]])
    masked = ds.subset(ds.y == 2)
    assert (masked.y == 2).all() and len(masked) == 13


# ---- hold-out split -----------------------------------------------------------------------


def test_holdout_split_is_stratified_disjoint_and_complete():
    ds = make_dataset(n=100, n_classes=4)
    train, holdout = holdout_split(ds, 0.25, seed=1)
    ids = np.concatenate([train.meta["row_id"], holdout.meta["row_id"]])
    assert sorted(ids.tolist()) == list(range(100))
    assert holdout.class_counts().tolist() == [round(0.25 * c) for c in ds.class_counts()]
    assert (np.diff(train.meta["row_id"]) > 0).all()  # original order kept


def test_holdout_split_is_deterministic_per_seed():
    ds = make_dataset(n=100)
    a = holdout_split(ds, seed=7)[1].meta["row_id"]
    b = holdout_split(ds, seed=7)[1].meta["row_id"]
    c = holdout_split(ds, seed=8)[1].meta["row_id"]
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_holdout_split_keeps_a_rare_class_in_train():
    X = np.zeros((6, 2), np.float32)
    y = np.array([0, 0, 0, 0, 0, 1], np.int64)
    train, holdout = holdout_split(Dataset(X, y, 3), 0.5, seed=0)
    assert train.class_counts().tolist() == [3, 1, 0]
    assert holdout.class_counts().tolist() == [2, 0, 0]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_holdout_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        holdout_split(make_dataset(), fraction, seed=0)


# ---- resolve_data_dir ---------------------------------------------------------------------


def test_explicit_dir_wins_over_environment(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    assert resolve_data_dir(str(tmp_path), {DATA_DIR_ENV: str(other)}) == tmp_path.resolve()


def test_environment_is_used_when_no_explicit_dir(tmp_path):
    assert resolve_data_dir(None, {DATA_DIR_ENV: str(tmp_path)}) == tmp_path.resolve()
    assert resolve_data_dir("", {DATA_DIR_ENV: str(tmp_path)}) == tmp_path.resolve()


def test_no_dir_given_names_option_variable_and_files():
    with pytest.raises(DataError) as error:
        resolve_data_dir(None, {})
    text = str(error.value)
    assert DATA_DIR_ENV in text and "--data-dir" in text and "fan_damage1.npz" in text


def test_missing_dir_and_file_instead_of_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope", {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_dir(None, {DATA_DIR_ENV: str(tmp_path / "file")})


def test_needed_file_missing_lists_expected_files(tmp_path):
    with pytest.raises(DataError) as error:
        resolve_data_dir(tmp_path, {}, needs=["hapt_windows.npz"])
    text = str(error.value)
    assert "hapt_windows.npz: file not found" in text
    assert all(name in text for name in DATA_FILES)


def test_real_data_dir_has_every_file(data_dir):
    assert resolve_data_dir(data_dir, {}, needs=DATA_FILES) == data_dir.resolve()
    assert data_file(data_dir, "fan_fleet.npz").is_file()


# ---- Standardizer -------------------------------------------------------------------------


def test_standardizer_fit_apply_roundtrip():
    ds = make_dataset(n=200)
    scaler = Standardizer.fit(ds.X)
    Z = scaler.apply(ds.X)
    np.testing.assert_allclose(Z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(Z.std(axis=0), 1, atol=1e-4)
    again = Standardizer.from_arrays(scaler.to_arrays())
    np.testing.assert_array_equal(again.apply(ds.X), Z)
    assert scaler.apply_to(ds).meta["standardizer"] is scaler


def test_standardizer_constant_feature_is_only_centred():
    X = np.ones((10, 2), np.float32)
    X[:, 1] = np.arange(10)
    assert np.isfinite(Standardizer.fit(X).apply(X)).all()


def test_standardizer_from_bad_arrays():
    with pytest.raises(DataError, match="missing feature_scale"):
        Standardizer.from_arrays({"feature_mean": np.zeros(3)})
    with pytest.raises(DataError, match="positive"):
        Standardizer.from_arrays({"feature_mean": np.zeros(3), "feature_scale": np.zeros(3)})
    with pytest.raises(DataError, match="non-finite"):
        Standardizer.from_arrays(
            {"feature_mean": np.array([0, np.nan]), "feature_scale": np.ones(2)}
        )
