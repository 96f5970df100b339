"""Every CNN and PEFT layer's backward against central finite differences (float64)."""

import numpy as np
import pytest

from agent.trainer.cnn import layers as cl
from agent.trainer.cnn import peft
from tests.test_trainer_layers import numeric_grad, projected

TOL = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def check(loss, pairs):
    for analytic, wrt in pairs:
        np.testing.assert_allclose(analytic, numeric_grad(loss, wrt), **TOL)


def test_im2col_then_a_product_is_a_direct_3x3_convolution(rng):
    x, W = rng.standard_normal((2, 5, 4, 3)), rng.standard_normal((27, 2))
    y, _ = cl.conv_forward(x, W, np.zeros(2), 3)
    kernel = W.reshape(3, 3, 3, 2)  # (tap row, tap col, C_in, C_out)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    direct = np.zeros((2, 5, 4, 2))
    for i in range(5):
        for j in range(4):
            direct[:, i, j] = np.einsum("bklc,klcm->bm", xp[:, i : i + 3, j : j + 3], kernel)
    np.testing.assert_allclose(y, direct, rtol=1e-12, atol=1e-12)


def test_col2im_is_the_adjoint_of_im2col(rng):
    x, d = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((32, 27))
    lhs = float((cl.im2col(x, 3) * d).sum())
    rhs = float((x * cl.col2im(d, x.shape, 3)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_conv_backward(rng):
    x, W, b = (
        rng.standard_normal((2, 4, 3, 2)),
        rng.standard_normal((18, 3)),
        rng.standard_normal(3),
    )
    R = rng.standard_normal((2, 4, 3, 3))
    _, cache = cl.conv_forward(x, W, b, 3)
    dx, dW, db = cl.conv_backward(R, cache)
    check(projected(lambda: cl.conv_forward(x, W, b, 3)[0], R), ((dx, x), (dW, W), (db, b)))
    assert cl.conv_backward(R, cache, need_dx=False, need_dW=False)[:2] == (None, None)


def test_depthwise_backward(rng):
    x, W, b = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((9, 3)), rng.standard_normal(3)
    R = rng.standard_normal((2, 4, 4, 3))
    _, cache = cl.depthwise_forward(x, W, b, 3)
    dx, dW, db = cl.depthwise_backward(R, cache)
    check(projected(lambda: cl.depthwise_forward(x, W, b, 3)[0], R), ((dx, x), (dW, W), (db, b)))


def test_depthwise_is_a_conv_whose_kernel_is_diagonal_in_channels(rng):
    x, W = rng.standard_normal((2, 4, 4, 3)), rng.standard_normal((9, 3))
    full = np.zeros((9, 3, 3))
    for c in range(3):
        full[:, c, c] = W[:, c]
    y_dw, _ = cl.depthwise_forward(x, W, np.zeros(3), 3)
    y_conv, _ = cl.conv_forward(x, full.reshape(27, 3), np.zeros(3), 3)
    np.testing.assert_allclose(y_dw, y_conv, rtol=1e-12, atol=1e-12)


def test_pointwise_backward(rng):
    x, W, b = rng.standard_normal((2, 3, 3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    R = rng.standard_normal((2, 3, 3, 2))
    _, cache = cl.pointwise_forward(x, W, b)
    dx, dW, db = cl.pointwise_backward(R, cache)
    check(projected(lambda: cl.pointwise_forward(x, W, b)[0], R), ((dx, x), (dW, W), (db, b)))


def test_bn2d_train_backward(rng):
    x, gamma, beta = (
        rng.standard_normal((2, 3, 3, 4)),
        rng.standard_normal(4),
        rng.standard_normal(4),
    )
    R = rng.standard_normal(x.shape)
    _, cache = cl.bn2d_train_forward(x, gamma, beta)
    dx, dgamma, dbeta = cl.bn2d_train_backward(R, cache)
    loss = projected(lambda: cl.bn2d_train_forward(x, gamma, beta)[0], R)
    check(loss, ((dx, x), (dgamma, gamma), (dbeta, beta)))


def test_maxpool_backward(rng):
    x, R = rng.standard_normal((2, 4, 6, 3)), rng.standard_normal((2, 2, 3, 3))
    y, cache = cl.maxpool_forward(x)
    assert y[0, 1, 2, 1] == x[0, 2:4, 4:6, 1].max()
    check(projected(lambda: cl.maxpool_forward(x)[0], R), ((cl.maxpool_backward(R, cache), x),))


def test_maxpool_sends_a_tied_window_one_gradient():
    x = np.zeros((1, 2, 2, 1))  # four equal pixels (ReLU outputs are often all zero)
    _, cache = cl.maxpool_forward(x)
    dx = cl.maxpool_backward(np.ones((1, 1, 1, 1)), cache)
    assert dx.sum() == 1.0 and dx[0, 0, 0, 0] == 1.0


def test_dora_rows_backward(rng):
    x, W0 = rng.standard_normal((5, 6)), rng.standard_normal((6, 4))
    A, B = rng.standard_normal((6, 2)), rng.standard_normal((2, 4))
    m, b = rng.random(4) + 0.5, rng.standard_normal(4)
    R = rng.standard_normal((5, 4))
    _, cache = peft.dora_forward(x, W0, A, B, m, b)
    dx, dA, dB, dm = peft.dora_backward(R, cache)
    loss = projected(lambda: peft.dora_forward(x, W0, A, B, m, b)[0], R)
    check(loss, ((dx, x), (dA, A), (dB, B), (dm, m)))


def test_dora_starts_as_the_base_weight_and_matches_its_merged_form(rng):
    x, W0 = rng.standard_normal((5, 6)), rng.standard_normal((6, 4))
    A, zero = rng.standard_normal((6, 2)), np.zeros((2, 4))
    m = peft.dora_init_magnitude(W0)
    y, _ = peft.dora_forward(x, W0, A, zero, m, np.zeros(4))
    np.testing.assert_allclose(y, x @ W0, rtol=1e-12)
    B = rng.standard_normal((2, 4))
    merged, _ = peft.dora_merge(W0, A, B, m * 1.3)
    y, _ = peft.dora_forward(x, W0, A, B, m * 1.3, np.zeros(4))
    np.testing.assert_allclose(y, x @ merged, rtol=1e-12)


def test_merged_lora_and_dora_backward(rng):
    W0, A, B = rng.standard_normal((9, 3)), rng.standard_normal((9, 2)), rng.standard_normal((2, 3))
    m, G = rng.random(3) + 0.5, rng.standard_normal((9, 3))
    _, cache = peft.lora_merge(W0, A, B)
    dA, dB = peft.lora_merge_backward(G, cache)
    check(projected(lambda: peft.lora_merge(W0, A, B)[0], G), ((dA, A), (dB, B)))
    _, cache = peft.dora_merge(W0, A, B, m)
    dA, dB, dm = peft.dora_merge_backward(G, cache)
    check(projected(lambda: peft.dora_merge(W0, A, B, m)[0], G), ((dA, A), (dB, B), (dm, m)))


def test_bottleneck_adapter_backward(rng):
    x = rng.standard_normal((6, 4))
    arrays = [rng.standard_normal(s) for s in ((4, 2), (2,), (2, 4), (4,))]
    R = rng.standard_normal((6, 4))
    _, cache = peft.bottleneck_forward(x, *arrays)
    dx, *grads = peft.bottleneck_backward(R, cache)
    loss = projected(lambda: peft.bottleneck_forward(x, *arrays)[0], R)
    check(loss, ((dx, x), *zip(grads, arrays, strict=True)))


def test_bottleneck_adapter_with_a_zero_up_projection_is_the_identity(rng):
    x = rng.standard_normal((6, 4))
    y, _ = peft.bottleneck_forward(x, rng.standard_normal((4, 2)), np.zeros(2), np.zeros((2, 4)),
                                   np.zeros(4))  # fmt: skip
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_galore_projects_on_the_shorter_side_and_keeps_the_top_directions(rng, shape):
    G = rng.standard_normal(shape)
    P, side = peft.galore_projector(G, 3)
    low = peft.galore_project(G, P, side)
    assert low.shape == ((3, 20) if shape[0] == 8 else (20, 3))
    U, S, Vt = np.linalg.svd(G, full_matrices=False)
    best = (U[:, :3] * S[:3]) @ Vt[:3]  # the best rank-3 approximation of G
    np.testing.assert_allclose(peft.galore_project_back(low, P, side), best, atol=1e-10)


def test_avgpool_backward(rng):
    x, R = rng.standard_normal((2, 4, 6, 3)), rng.standard_normal((2, 2, 3, 3))
    y, cache = cl.avgpool_forward(x, 2)
    assert y[1, 1, 2, 0] == pytest.approx(x[1, 2:4, 4:6, 0].mean())
    check(projected(lambda: cl.avgpool_forward(x, 2)[0], R), ((cl.avgpool_backward(R, cache), x),))
