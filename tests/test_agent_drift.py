"""Label-free drift scores: BN1 z-scores and prediction entropy, and the recent-input window."""

from __future__ import annotations

import numpy as np
import pytest

from agent.drift import (
    RecentInputs,
    bn_mean_squared_z,
    mean_normalized_entropy,
    score_recent,
)
from agent.trainer.model import BaseModel, init_params


def test_z_score_is_about_one_in_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    mean, var = np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 0.25])
    h = rng.normal(mean, np.sqrt(var), size=(20_000, 3))
    assert bn_mean_squared_z(h, mean, var) == pytest.approx(1.0, abs=0.03)
    shifted = h + 2 * np.sqrt(var)  # every unit 2 standard deviations off: 1 + 2² = 5
    assert bn_mean_squared_z(shifted, mean, var) == pytest.approx(5.0, abs=0.1)


def test_z_score_checks_shapes():
    with pytest.raises(ValueError):
        bn_mean_squared_z(np.zeros((2, 3)), np.zeros(4), np.ones(4))
    with pytest.raises(ValueError):
        bn_mean_squared_z(np.zeros((0, 3)), np.zeros(3), np.ones(3))


def test_entropy_is_zero_when_certain_and_one_when_uniform():
    assert mean_normalized_entropy(np.array([[100.0, 0.0, 0.0]])) == pytest.approx(0.0, abs=1e-6)
    assert mean_normalized_entropy(np.zeros((5, 3))) == pytest.approx(1.0)
    mixed = mean_normalized_entropy(np.array([[100.0, 0, 0], [0.0, 0, 0]]))
    assert mixed == pytest.approx(0.5)


def mlp(in_mean, in_std, W1, b1, mean1, var1):
    """An MLP base model whose first layer is given (the rest is never looked at here)."""
    params = init_params(2, 3, np.random.default_rng(0), hidden=2)
    params.update(in_mean=in_mean, in_std=in_std, W1=W1, b1=b1, mean1=mean1, var1=var1)
    return BaseModel({k: np.asarray(v, dtype=np.float32) for k, v in params.items()})


def test_mlp_bn1_pre_activations_use_the_models_standardisation():
    model = mlp([1.0, 1.0], [2.0, 2.0], np.eye(2), [0.5, 0.0], [0.1, 0.2], [3.0, 4.0])
    out, mean, var = model.bn1_pre_activations(np.array([[3.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[1.5, 0.0]])
    np.testing.assert_allclose(np.stack([mean, var]), [[0.1, 0.2], [3.0, 4.0]])


def test_score_recent_combines_both():
    model = mlp(np.zeros(2), np.ones(2), np.eye(2), np.zeros(2), np.zeros(2), np.ones(2))
    scores = score_recent(model, np.full((4, 2), 3.0, dtype=np.float32), np.zeros((4, 3)))
    assert scores.bn1_mean_squared_z == pytest.approx(9.0, rel=1e-4)
    assert scores.prediction_entropy == pytest.approx(1.0)
    assert scores.rows == 4


def test_a_cnns_drift_score_is_near_1_on_its_pre_training_images_and_grows_when_rotated():
    from agent.trainer.cnn.finetune import pretrain_cnn
    from tests.test_cnn_model import SIDE, toy_images

    X, y = toy_images(300)
    model = pretrain_cnn(X, y, 2, architecture="dwcnn", epochs=2, side=SIDE, batch_size=10)
    rows, mean, _ = model.bn1_pre_activations(X[:50])
    assert rows.shape == (50 * SIDE * SIDE, len(mean))  # every pixel of every image a row
    logits = model.logits(X[:50])
    calm = score_recent(model, X[:50], logits).bn1_mean_squared_z
    drifted = X[:50].reshape(-1, SIDE, SIDE).transpose(0, 2, 1).reshape(50, -1) * 3.0
    assert calm == pytest.approx(1.0, abs=0.5)
    assert score_recent(model, drifted, logits).bn1_mean_squared_z > calm + 1.0


def test_recent_inputs_keeps_the_last_rows_oldest_first():
    window = RecentInputs(capacity=3, n_features=1)
    assert len(window) == 0 and window.snapshot().shape == (0, 1)
    window.add(np.array([[1.0], [2.0]]))
    window.add(np.array([[3.0], [4.0]]))
    np.testing.assert_array_equal(window.snapshot().ravel(), [2.0, 3.0, 4.0])
    window.add(np.arange(10.0).reshape(10, 1))
    np.testing.assert_array_equal(window.snapshot().ravel(), [7.0, 8.0, 9.0])
    with pytest.raises(ValueError):
        window.add(np.zeros((1, 2)))
