"""Each CNN method's gradients against finite differences, on tiny versions of both CNNs, and
that each computes only the gradients (and keeps only the activations) it needs."""

import numpy as np
import pytest

from agent.trainer.cnn import arch
from agent.trainer.cnn.backprop import CnnTrainer
from agent.trainer.cnn.methods import CNN_METHODS, resolve_cnn
from agent.trainer.cnn.model import CnnModel, init_cnn
from tests.test_trainer_methods import numeric

SIDE, CLASSES, BATCH, RANK = 8, 3, 4, 2
BACKPROP = [name for name, m in CNN_METHODS.items() if not m.skip]
TINY = {"cnn": {"width": 2, "hidden": 3}, "dwcnn": {"width": 2}}


def tiny_model(architecture: str, seed=0) -> CnnModel:
    rng = np.random.default_rng(seed)
    units = arch.build(architecture, CLASSES, SIDE, **TINY[architecture])
    model = init_cnn(units, rng, SIDE)
    params = {k: v.astype(np.float64) for k, v in model.params.items()}
    for name, value in params.items():  # biases and BN statistics away from ReLU's kink
        if name[0] == "b" or name.startswith("mean"):
            params[name] = rng.standard_normal(value.shape)
        elif name.startswith("var"):
            params[name] = rng.random(value.shape) + 0.5
    return CnnModel(model.units, params, SIDE)


def batch(seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, SIDE * SIDE)), rng.integers(0, CLASSES, BATCH)


def mean_loss(trainer, x, labels):
    probs, _ = trainer.forward_arrays(x, labels)["loss"]
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def trainer_for(architecture, method, seed=2):
    trainer = CnnTrainer(tiny_model(architecture), resolve_cnn(method), lr=1.0, rank=RANK,
                         rng=np.random.default_rng(seed))  # fmt: skip
    for name, array in trainer.trainable.items():  # B, W_up, b_down start at 0: move them
        if name[0] == "B" or name[:2] in ("Wu", "bd"):
            array += np.random.default_rng(3).standard_normal(array.shape) * 0.3
    return trainer


@pytest.mark.parametrize("architecture", ["cnn", "dwcnn"])
@pytest.mark.parametrize("method", BACKPROP)
def test_cnn_method_gradients_match_finite_differences(architecture, method):
    trainer = trainer_for(architecture, method)
    x, labels = batch()
    grads = trainer.backward(trainer.forward_arrays(x, labels))
    assert set(grads) == set(trainer.trainable)  # every trained array, nothing else
    for name, grad in grads.items():
        expected = numeric(lambda: mean_loss(trainer, x, labels), trainer.trainable[name])
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7, err_msg=name)


@pytest.mark.parametrize(
    ("method", "lowest"),
    [("ft-all", 1), ("lora-all", 1), ("dora", 1), ("ft-last", 4), ("lora-last", 4),
     ("adapter", 1.5)],
)  # fmt: skip
def test_backward_stops_at_the_lowest_trained_position(method, lowest):
    trainer = trainer_for("cnn", method)
    ctx = trainer.forward_arrays(*batch())
    assert trainer.lowest == lowest
    kept = [u for u, (unit_cache, _) in enumerate(ctx["units"], start=1) if unit_cache is not None]
    assert kept == [u for u in range(1, 5) if u >= lowest]  # nothing kept below it


def test_trainable_parameters_of_each_method():
    model = tiny_model("dwcnn")
    counts = {name: CnnTrainer(model, resolve_cnn(name), lr=0.1, rank=RANK,
                               rng=np.random.default_rng(0)).trainable_params
              for name in BACKPROP}  # fmt: skip
    assert counts["ft-all"] == counts["galore"] == model.n_parameters
    last = model.units[-1]
    assert counts["ft-last"] == last.c_in * last.c_out + last.c_out
    assert counts["lora-last"] == RANK * (last.c_in + last.c_out)
    lora_all = sum(RANK * sum(u.weight_shape()) for u in model.units)
    assert counts["lora-all"] == lora_all
    assert counts["dora"] == lora_all + sum(u.c_out for u in model.units)  # plus magnitudes


@pytest.mark.parametrize("method", BACKPROP)
def test_a_few_steps_lower_the_training_loss(method):
    model = tiny_model("cnn")
    rng = np.random.default_rng(5)
    trainer = CnnTrainer(model, resolve_cnn(method), lr=0.05, rank=RANK, rng=rng)
    x, labels = batch(9)
    before = mean_loss(trainer, x, labels)
    for _ in range(30):
        trainer.step(x, labels)
    assert mean_loss(trainer, x, labels) < before


@pytest.mark.parametrize("method", ["lora-all", "dora", "adapter"])
def test_adapted_methods_start_equal_to_the_base_model(method):
    model = tiny_model("dwcnn")
    trainer = CnnTrainer(model, resolve_cnn(method), lr=0.1, rank=RANK,
                         rng=np.random.default_rng(0))  # fmt: skip
    x, _ = batch()
    np.testing.assert_allclose(trainer.logits(x), model.frozen_features(x, True)[1], rtol=1e-10)
