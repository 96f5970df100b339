"""Pre-training options. A base model of any hidden width: pre-trained with it, saved with it in
the header, loaded and fine-tuned at it; a file from before the header said (96, the arrays
alone) still loads, and a header that disagrees with the weights is refused. A feature constant
in pre-training is not blown up by standardising."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.trainer.errors import ModelFileError
from agent.trainer.finetune import finetune, pretrain
from agent.trainer.model import BaseModel


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    X = (rng.normal(0, 2.0, (4, 10))[y] + rng.normal(0, 1.0, (400, 10))).astype(np.float32)
    return X, y


def rewrite_header(path, change) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    header = json.loads(str(arrays.pop("header")))
    change(header)
    np.savez(path, header=np.array(json.dumps(header)), **arrays)


@pytest.mark.parametrize("hidden", [8, 33])
def test_a_model_of_another_width_saves_loads_and_fine_tunes_at_it(tmp_path, rows, hidden):
    X, y = rows
    model = pretrain(X, y, 4, epochs=3, seed=0, hidden=hidden)
    assert model.params["W2"].shape == (hidden, hidden) and model.hidden_width == hidden
    model.save(tmp_path / "m.npz")
    loaded = BaseModel.load(tmp_path / "m.npz")
    assert loaded.layer_input_dims == (10, hidden, hidden)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    with np.load(tmp_path / "m.npz") as npz:
        assert json.loads(str(npz["header"]))["hidden"] == hidden
    result = finetune(loaded, X, y, epochs=2, seed=0)
    shapes = [(10, 4), (hidden, 4), (hidden, 4)]  # d_k × C for d = (10, H, H)
    assert [d.shape for d in result.adapter.effective_deltas()] == shapes


def test_a_file_without_the_hidden_key_loads_by_its_arrays(tmp_path, rows):
    pretrain(*rows, 4, epochs=1, seed=0).save(tmp_path / "old.npz")
    rewrite_header(tmp_path / "old.npz", lambda header: header.pop("hidden"))
    assert BaseModel.load(tmp_path / "old.npz").hidden_width == 96


@pytest.mark.parametrize("claimed", [64, "96", True])
def test_a_header_that_disagrees_with_the_weights_is_refused(tmp_path, rows, claimed):
    pretrain(*rows, 4, epochs=1, seed=0).save(tmp_path / "m.npz")
    rewrite_header(tmp_path / "m.npz", lambda header: header.update(hidden=claimed))
    with pytest.raises(ModelFileError, match=r"header says hidden width .* the weights have 96"):
        BaseModel.load(tmp_path / "m.npz")


def test_a_hidden_width_below_one_is_refused(rows):
    with pytest.raises(ValueError, match="hidden width must be >= 1"):
        pretrain(*rows, 4, epochs=1, hidden=0)


def test_a_feature_constant_in_pre_training_keeps_a_unit_scale(rows):
    """A blank pixel in every pre-training image, inked on a device: standardised by ~0 it was
    ~1e7 and overflowed the logits; with scale 1 it stays what it is."""
    X, y = rows
    X = X.copy()
    X[:, 3] = 0.0  # constant in pre-training
    model = pretrain(X, y, 4, epochs=2, seed=0)
    assert model.params["in_std"][3] == 1.0
    np.testing.assert_allclose(model.params["in_std"][:3], X[:, :3].std(axis=0) + 1e-6, rtol=1e-6)
    inked = X[:5].copy()
    inked[:, 3] = 16.0
    assert model.standardize(inked)[:, 3].tolist() == [16.0] * 5
    assert np.isfinite(model.logits(inked)).all()
