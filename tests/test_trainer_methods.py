"""Each method's gradients against finite differences, and that it computes only what it needs."""

import numpy as np
import pytest

from agent.trainer import layers
from agent.trainer.backprop import BackpropTrainer
from agent.trainer.finetune import one_hot
from agent.trainer.methods import METHODS
from agent.trainer.model import BaseModel, init_params
from agent.trainer.skip import SkipTrainer

N_IN, N_CLASSES, BATCH = 7, 3, 6
BACKPROP_METHODS = [name for name, spec in METHODS.items() if not spec.skip]


def tiny_model(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    params = init_params(N_IN, N_CLASSES, rng, hidden=5)
    params["mean1"] = rng.standard_normal(5)
    params["var1"] = rng.random(5) + 0.5
    params["b1"] = rng.standard_normal(5)  # biases away from zero: ReLU kinks stay rare
    params["b2"] = rng.standard_normal(5)
    return BaseModel({k: np.asarray(v, dtype=dtype) for k, v in params.items()})


def batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, N_IN)), rng.integers(0, N_CLASSES, BATCH)


def mean_loss(trainer, x, labels):
    caches = trainer.forward_arrays(x, labels)
    probs, _ = caches["loss"]
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def parameter(trainer, name):
    if name[0] in "AB" and name[1:].isdigit():
        A, B = trainer.lora[int(name[1:])]
        return A if name[0] == "A" else B
    return trainer.p[name]


def numeric(f, array, eps=1e-6):
    grad = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        keep = array[i]
        array[i] = keep + eps
        plus = f()
        array[i] = keep - eps
        minus = f()
        array[i] = keep
        grad[i] = (plus - minus) / (2 * eps)
    return grad


@pytest.mark.parametrize("method", BACKPROP_METHODS)
def test_backprop_method_gradients_match_finite_differences(method):
    spec = METHODS[method]
    model = tiny_model()
    trainer = BackpropTrainer(model.params, spec, lr=1.0, rank=2, rng=np.random.default_rng(3))
    for _A, B in trainer.lora.values():  # B starts at zero; give it values so dA is non-trivial
        B += np.random.default_rng(4).standard_normal(B.shape)
    x, labels = batch()
    grads = trainer.backward(trainer.forward_arrays(x, labels))
    assert grads, "every method trains something"
    for name, analytic in grads.items():
        expected = numeric(lambda: mean_loss(trainer, x, labels), parameter(trainer, name))
        np.testing.assert_allclose(analytic, expected, rtol=1e-4, atol=1e-7, err_msg=name)


EXPECTED_TRAINED = {
    "ft-all": {"W1", "b1", "W2", "b2", "W3", "b3", "gamma1", "beta1", "gamma2", "beta2"},
    "ft-last": {"W3", "b3"},
    "ft-bias": {"b1", "b2", "b3"},
    "ft-all-lora": {"W1", "b1", "W2", "b2", "W3", "b3", "gamma1", "beta1", "gamma2", "beta2"}
    | {"A1", "B1", "A2", "B2", "A3", "B3"},
    "lora-all": {"A1", "B1", "A2", "B2", "A3", "B3"},
    "lora-last": {"A3", "B3"},
}


@pytest.mark.parametrize("method", BACKPROP_METHODS)
def test_backprop_method_computes_only_its_gradients(method, monkeypatch):
    """Exactly the trained parameters get gradients, and no dx is computed below them."""
    spec = METHODS[method]
    trainer = BackpropTrainer(
        tiny_model().params, spec, lr=1.0, rank=2, rng=np.random.default_rng()
    )
    seen = []
    real = layers.fc_backward

    def spy(dy, cache, **flags):
        seen.append(flags)
        return real(dy, cache, **flags)

    monkeypatch.setattr(layers, "fc_backward", spy)
    grads = trainer.backward(trainer.forward_arrays(*batch()))
    assert set(grads) == EXPECTED_TRAINED[method]
    assert len(seen) == 4 - spec.lowest_trained_layer  # backprop stops at the lowest trained
    assert seen[-1]["need_dx"] is False  # ...and never computes dx of that layer


def skip_reference_loss(model, x, labels, factors):
    xs, z = model.frozen_features(x)
    logits = z + sum(xk @ A @ B for xk, (A, B) in zip(xs, factors, strict=True))
    probs = layers.softmax(logits)
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def test_skip_lora_gradients_match_finite_differences():
    model = tiny_model(np.float32)
    x, labels = batch()
    x = x.astype(np.float32)
    trainer = SkipTrainer(model, lr=1.0, rank=2, rng=np.random.default_rng(5), n_samples=BATCH)
    rng = np.random.default_rng(6)
    head = trainer.head
    head.assign([(A, rng.standard_normal(B.shape)) for A, B in head.factors()])
    perm = np.arange(BATCH)
    trainer.begin_epoch(model.standardize(x), labels, one_hot(labels, N_CLASSES), perm)
    views = trainer.backward(trainer.forward(0, BATCH))  # lr = 1: the plain gradients
    factors = [
        (f[0].astype(np.float64), f[1].astype(np.float64)) for f in trainer.adapter().factors
    ]
    model64 = BaseModel({k: v.astype(np.float64) for k, v in model.params.items()})
    loss = lambda: skip_reference_loss(model64, x.astype(np.float64), labels, factors)  # noqa: E731
    for (A, B), (gA, gB) in zip(factors, head.gradients(), strict=True):
        np.testing.assert_allclose(gA, numeric(loss, A), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(gB, numeric(loss, B), rtol=1e-5, atol=1e-7)
    # the fused products also reach entries that must not train (A_k from another layer's
    # input, the identities that pass z through): the step leaves them as they were
    fixed = head.step_size == 0
    before = head.theta.copy()
    assert np.abs(head.QT.dot(head.G)[fixed[: head.P.size].reshape(head.P.shape)]).max() > 0
    trainer.update(views)
    np.testing.assert_array_equal(head.theta[fixed], before[fixed])
    assert not np.array_equal(head.theta[~fixed], before[~fixed])
