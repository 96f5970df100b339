"""Every layer's backward against central finite differences (float64)."""

import numpy as np
import pytest

from agent.trainer import layers

EPS = 1e-6


def numeric_grad(f, x):
    """Central differences of the scalar f() with respect to every entry of x (in place)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        keep = x[i]
        x[i] = keep + EPS
        plus = f()
        x[i] = keep - EPS
        minus = f()
        x[i] = keep
        grad[i] = (plus - minus) / (2 * EPS)
    return grad


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def projected(out_fn, weights):
    """A scalar loss sum(out * weights): its gradient wrt out is exactly `weights`."""
    return lambda: float((out_fn() * weights).sum())


def test_fc_backward(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    R = rng.standard_normal((5, 3))
    _, cache = layers.fc_forward(x, W, b)
    dx, dW, db = layers.fc_backward(R, cache)
    loss = projected(lambda: layers.fc_forward(x, W, b)[0], R)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dW, numeric_grad(loss, W), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-8)


def test_fc_backward_skips_unneeded_gradients(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    _, cache = layers.fc_forward(x, W, b)
    dx, dW, db = layers.fc_backward(np.ones((5, 3)), cache, need_dx=False, need_dW=False)
    assert dx is None and dW is None and db is not None


def test_lora_backward(rng):
    x, A, B = rng.standard_normal((5, 6)), rng.standard_normal((6, 2)), rng.standard_normal((2, 3))
    R = rng.standard_normal((5, 3))
    _, cache = layers.lora_forward(x, A, B)
    dx, dA, dB = layers.lora_backward(R, cache)
    loss = projected(lambda: layers.lora_forward(x, A, B)[0], R)
    for analytic, wrt in ((dx, x), (dA, A), (dB, B)):
        np.testing.assert_allclose(analytic, numeric_grad(loss, wrt), rtol=1e-6, atol=1e-8)
    assert layers.lora_backward(R, cache, need_dx=False)[0] is None


def test_bn_train_backward(rng):
    x, gamma, beta = rng.standard_normal((6, 4)), rng.standard_normal(4), rng.standard_normal(4)
    R = rng.standard_normal((6, 4))
    _, cache = layers.bn_train_forward(x, gamma, beta)
    dx, dgamma, dbeta = layers.bn_train_backward(R, cache)
    loss = projected(lambda: layers.bn_train_forward(x, gamma, beta)[0], R)
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, numeric_grad(loss, gamma), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dbeta, numeric_grad(loss, beta), rtol=1e-6, atol=1e-8)


def test_bn_infer_backward(rng):
    x, gamma, beta = rng.standard_normal((6, 4)), rng.standard_normal(4), rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.random(4) + 0.5
    R = rng.standard_normal((6, 4))
    _, cache = layers.bn_infer_forward(x, gamma, beta, mean, var)
    loss = projected(lambda: layers.bn_infer_forward(x, gamma, beta, mean, var)[0], R)
    np.testing.assert_allclose(
        layers.bn_infer_backward(R, cache), numeric_grad(loss, x), rtol=1e-6, atol=1e-8
    )


def test_relu_backward(rng):
    x = rng.standard_normal((5, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the kink
    R = rng.standard_normal((5, 4))
    _, mask = layers.relu_forward(x)
    loss = projected(lambda: layers.relu_forward(x)[0], R)
    np.testing.assert_allclose(layers.relu_backward(R, mask), numeric_grad(loss, x), atol=1e-8)


def test_softmax_xent_backward(rng):
    logits, labels = rng.standard_normal((5, 3)), np.array([0, 2, 1, 1, 0])
    _, cache = layers.softmax_xent_forward(logits, labels)
    loss = lambda: layers.softmax_xent_forward(logits, labels)[0]  # noqa: E731
    np.testing.assert_allclose(
        layers.softmax_xent_backward(cache), numeric_grad(loss, logits), rtol=1e-5, atol=1e-8
    )


def test_softmax_is_stable_for_large_logits():
    probs = layers.softmax(np.array([[1000.0, 0.0, -1000.0]]))
    assert np.isfinite(probs).all() and probs[0, 0] == pytest.approx(1.0)
