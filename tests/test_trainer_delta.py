"""Skip adapters trained as ΔW_k itself (DeltaHead), warm starts, and the step budget."""

import numpy as np
import pytest

from agent.data import load_fan_task
from agent.trainer import layers
from agent.trainer.adapter import Adapter
from agent.trainer.finetune import finetune, one_hot, pretrain, run_epochs, run_method
from agent.trainer.model import BaseModel
from agent.trainer.skip import SkipTrainer
from tests.test_trainer_methods import BATCH, N_CLASSES, batch, numeric, tiny_model


def reference_loss(model, x, labels, deltas):
    """Mean cross-entropy of logits z + Σ_k x_k ΔW_k, from the composed reference layers."""
    xs, z = model.frozen_features(x)
    logits = z + sum(xk @ dk for xk, dk in zip(xs, deltas, strict=True))
    probs = layers.softmax(logits)
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def start_adapter(model, seed=7):
    rng = np.random.default_rng(seed)
    dims = model.layer_input_dims
    deltas = tuple(rng.standard_normal((d, N_CLASSES)).astype(np.float32) * 0.3 for d in dims)
    return Adapter(dims, N_CLASSES, deltas)


def test_delta_head_gradient_matches_the_closed_form_and_finite_differences():
    model = tiny_model(np.float32)
    x, labels = batch()
    x = x.astype(np.float32)
    start = start_adapter(model)
    trainer = SkipTrainer(model, lr=1.0, rank=2, rng=np.random.default_rng(5),
                          n_samples=BATCH, start=start, delta=True)  # fmt: skip
    trainer.begin_epoch(model.standardize(x), labels, one_hot(labels, N_CLASSES), np.arange(BATCH))
    views = trainer.backward(trainer.forward(0, BATCH))  # lr = 1: the plain mean gradients
    model64 = BaseModel({k: v.astype(np.float64) for k, v in model.params.items()})
    deltas = [d.astype(np.float64) for d in start.deltas]
    xs, z = model64.frozen_features(x.astype(np.float64))
    logits = z + sum(xk @ dk for xk, dk in zip(xs, deltas, strict=True))
    p_minus_y = layers.softmax(logits) - np.eye(N_CLASSES)[labels]
    head = trainer.head
    for xk, dk, g in zip(xs, deltas, head.gradients(), strict=True):
        np.testing.assert_allclose(g, xk.T @ p_minus_y / BATCH, rtol=1e-5, atol=1e-6)
        loss = lambda: reference_loss(model64, x.astype(np.float64), labels, deltas)  # noqa: E731
        np.testing.assert_allclose(g, numeric(loss, dk), rtol=1e-5, atol=1e-7)
    identity = head.M[:, head.D :].copy()
    before = [d.copy() for d in head.deltas()]
    trainer.update(views)
    np.testing.assert_array_equal(head.M[:, head.D :], identity)  # z passes through, untouched
    for old, new, g in zip(before, head.deltas(), head.gradients(), strict=True):
        np.testing.assert_allclose(new, old - g, rtol=1e-6, atol=1e-7)  # one SGD step, lr = 1


def test_delta_training_starts_exactly_from_the_start_adapter():
    model = tiny_model(np.float32)
    start = start_adapter(model)
    trainer = SkipTrainer(model, lr=0.1, rank=2, rng=np.random.default_rng(0), n_samples=BATCH,
                          start=start, delta=True)  # fmt: skip
    for got, want in zip(trainer.adapter().deltas, start.deltas, strict=True):
        np.testing.assert_array_equal(got, want)
    assert trainer.adapter().factors == (None, None, None)


def test_delta_training_on_some_layers_keeps_the_others_frozen():
    model = tiny_model(np.float32)
    x, labels = batch()
    start = start_adapter(model)
    trainer = SkipTrainer(model, layers=(3,), lr=0.5, rank=2, rng=np.random.default_rng(0),
                          n_samples=BATCH, start=start, delta=True)  # fmt: skip
    rng = np.random.default_rng(1)
    run_epochs(trainer, model.standardize(x.astype(np.float32)), labels, N_CLASSES, epochs=3,
               batch_size=BATCH, rng=rng, cancel=None, progress=None)  # fmt: skip
    out = trainer.adapter()
    np.testing.assert_array_equal(out.deltas[0], start.deltas[0])
    np.testing.assert_array_equal(out.deltas[1], start.deltas[1])
    assert not np.array_equal(out.deltas[2], start.deltas[2])


@pytest.fixture(scope="module")
def damage1(data_dir):
    task = load_fan_task(data_dir, "damage1")
    model = pretrain(task.pretrain.X, task.pretrain.y, 3, epochs=20, seed=0)
    return model, task


def test_skip2_delta_equals_skip_delta(damage1):
    """The Skip-Cache is exact for ΔW training too: the same adapter with and without it."""
    model, task = damage1
    X, y = task.finetune.X, task.finetune.y
    a = finetune(model, X, y, method="skip-delta", epochs=3, lr=0.05, seed=2).adapter
    b = finetune(model, X, y, method="skip2-delta", epochs=3, lr=0.05, seed=2).adapter
    for da, db in zip(a.deltas, b.deltas, strict=True):
        np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-6)


def test_skip2_delta_recovers_drifted_accuracy(damage1):
    model, task = damage1
    before = model.accuracy(task.test.X, task.test.y)
    result = finetune(model, task.finetune.X, task.finetune.y, method="skip2-delta", epochs=30,
                      lr=0.05, seed=0)  # fmt: skip
    assert model.accuracy(task.test.X, task.test.y, result.adapter) > before + 0.2


@pytest.mark.parametrize("steps", [1, 23, 24, 25, 100])
def test_a_step_budget_runs_exactly_that_many_batches(damage1, steps):
    model, task = damage1
    X, y = task.finetune.X[:470], task.finetune.y[:470]  # 24 batches of 20 an epoch
    result = run_method(model, X, y, method="skip2-delta", epochs=1, steps=steps, seed=0)
    assert result.steps == steps
    assert result.epochs_run == -(-steps // 24)


def test_a_step_budget_must_be_positive(damage1):
    model, task = damage1
    with pytest.raises(ValueError, match="steps"):
        run_method(model, task.finetune.X, task.finetune.y, method="skip2-delta", steps=0)
