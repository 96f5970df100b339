"""Label-free drift scores (BN1 z-scores, entropy, confidence, Mahalanobis, signature) and the
recent-input window."""

from __future__ import annotations

import numpy as np
import pytest

from agent.drift import (
    RecentInputs,
    bn_mean_squared_z,
    feature_signature,
    mahalanobis_squared,
    mean_feature_distance,
    mean_max_softmax_gap,
    mean_normalized_entropy,
    score_recent,
    shrunk_covariance,
    softmax,
)
from agent.trainer.calibration import DriftCalibration
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


def test_max_softmax_gap_is_zero_when_certain_and_one_minus_one_over_c_when_uniform():
    assert mean_max_softmax_gap(np.array([[100.0, 0.0, 0.0]])) == pytest.approx(0.0, abs=1e-12)
    assert mean_max_softmax_gap(np.zeros((4, 3))) == pytest.approx(2 / 3)
    two = np.log(np.array([[0.9, 0.1], [0.6, 0.4]]))  # max softmax 0.9 and 0.6
    assert mean_max_softmax_gap(two) == pytest.approx(((1 - 0.9) + (1 - 0.6)) / 2)
    with pytest.raises(ValueError):
        mean_max_softmax_gap(np.zeros((0, 3)))


def test_softmax_is_finite_for_huge_logits():
    p = softmax(np.array([[1e4, 0.0, -1e4]]))
    np.testing.assert_allclose(p, [[1.0, 0.0, 0.0]])


def test_mahalanobis_matches_the_quadratic_form_row_by_row():
    rng = np.random.default_rng(1)
    h, mean = rng.normal(size=(5, 4)), rng.normal(size=4)
    a = rng.normal(size=(4, 4))
    precision = a @ a.T + np.eye(4)
    expected = [(row - mean) @ precision @ (row - mean) for row in h]
    np.testing.assert_allclose(mahalanobis_squared(h, mean, precision), expected)
    with pytest.raises(ValueError):
        mahalanobis_squared(h, mean[:3], precision)


def test_feature_distance_is_about_one_for_gaussian_rows_under_their_own_precision():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 6))
    covariance = a @ a.T + 0.5 * np.eye(6)
    mean = rng.normal(size=6)
    h = rng.multivariate_normal(mean, covariance, size=50_000)
    precision = np.linalg.inv(covariance)
    assert mean_feature_distance(h, mean, precision) == pytest.approx(1.0, abs=0.02)
    shifted = h + 3 * np.sqrt(np.diag(covariance))  # far outside: much larger
    assert mean_feature_distance(shifted, mean, precision) > 3


def test_signature_is_the_mean_of_standardised_rows():
    h = np.array([[1.0, 10.0], [3.0, 30.0]])
    signature = feature_signature(h, np.array([1.0, 10.0]), np.array([2.0, 10.0]))
    assert signature.dtype == np.float32
    np.testing.assert_allclose(signature, [0.5, 1.0])  # mean of (0, 1) and (0, 2)


def ledoit_wolf_reference(h):
    """Ledoit & Wolf (2004) written out term by term, as a check of the vectorised one."""
    x = h - h.mean(axis=0)
    n, p = x.shape
    S = x.T @ x / n
    mu = np.trace(S) / p
    d2 = np.linalg.norm(S - mu * np.eye(p), "fro") ** 2 / p
    b2 = sum(np.linalg.norm(np.outer(r, r) - S, "fro") ** 2 for r in x) / n**2 / p
    a = min(b2, d2) / d2
    return (1 - a) * S + a * mu * np.eye(p), a


@pytest.mark.parametrize("n", [8, 40, 2000])
def test_shrunk_covariance_is_ledoit_wolf_and_invertible_with_few_rows(n):
    rng = np.random.default_rng(n)
    h = rng.normal(size=(n, 12)) * np.linspace(0.5, 3, 12)
    h[:, 0] = 0.0  # a dead unit: the sample covariance alone is singular
    covariance, shrinkage = shrunk_covariance(h)
    expected, expected_shrinkage = ledoit_wolf_reference(h)
    np.testing.assert_allclose(covariance, expected, rtol=1e-10, atol=1e-12)
    assert shrinkage == pytest.approx(expected_shrinkage)
    assert np.linalg.eigvalsh(covariance).min() > 0  # a precision matrix exists


def calibration(width=2, confidence=0.5, feature=2.0):
    return DriftCalibration(
        mean=np.zeros(width, np.float32),
        std=np.full(width, 2.0, np.float32),
        precision=np.eye(width, dtype=np.float32),
        confidence_threshold=confidence,
        feature_threshold=feature,
        window_rows=4,
        quantile=0.99,
        reference_rows=10,
        held_out_rows=10,
        windows=3,
    )


def test_calibrated_scores_are_the_raw_ones_over_their_thresholds():
    model = mlp(np.zeros(2), np.ones(2), np.eye(2), np.zeros(2), np.zeros(2), np.ones(2))
    hidden = np.array([[2.0, 0.0], [0.0, 2.0]])  # squared distances 4 and 4: mean / H = 2
    logits = np.zeros((2, 3))  # uniform: confidence 2/3
    rows = np.ones((2, 2), np.float32)
    scores = score_recent(model, rows, logits, hidden=hidden, calibration=calibration())
    assert scores.confidence == pytest.approx(2 / 3) and scores.feature == pytest.approx(2.0)
    assert scores.confidence_score == pytest.approx((2 / 3) / 0.5)
    assert scores.feature_score == pytest.approx(1.0)
    np.testing.assert_allclose(scores.signature, [0.5, 0.5])  # mean (1, 1) / std 2
    bare = score_recent(model, rows, logits)
    assert bare.feature is None and bare.confidence_score is None and bare.signature is None
