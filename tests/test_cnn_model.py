"""The CNN base model: its files, its frozen features, and Skip-LoRA / Skip2-LoRA on it."""

import numpy as np
import pytest

from agent.trainer.cnn import arch
from agent.trainer.cnn.finetune import pretrain_cnn, run_cnn_method
from agent.trainer.cnn.model import CnnModel
from agent.trainer.errors import ModelFileError
from agent.trainer.finetune import evaluate
from agent.trainer.layers import softmax
from tests.test_cnn_methods import SIDE, batch, tiny_model, trainer_for


def toy_images(n, seed=0):
    """Two classes a tiny CNN can tell apart: a bright top half or a bright left half."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    X = rng.random((n, SIDE, SIDE)).astype(np.float32) * 0.3
    X[y == 0, : SIDE // 2, :] += 1.0
    X[y == 1, :, : SIDE // 2] += 1.0
    return X.reshape(n, -1), y


@pytest.fixture(scope="module")
def toy_model():
    X, y = toy_images(200)
    return pretrain_cnn(X, y, 2, architecture="cnn", epochs=3, side=SIDE, batch_size=10, seed=0)


@pytest.mark.parametrize("architecture", ["cnn", "dwcnn"])
def test_both_architectures_have_four_layers_whose_inputs_the_features_return(architecture):
    model = tiny_model(architecture)
    xs, z = model.frozen_features(np.random.default_rng(0).standard_normal((5, SIDE * SIDE)))
    assert [x.shape[1] for x in xs] == list(model.layer_input_dims) and len(xs) == 4
    assert z.shape == (5, 3)
    side2 = SIDE // 2  # after the first unit's pooling; layer 2's input is pooled 2×2 once more
    assert model.layer_input_dims[:2] == (SIDE * SIDE, (side2 // 2) ** 2 * 2)


def test_full_size_models_are_pi_sized():
    for name, expected_dims in (("cnn", (784, 784, 1568, 64)), ("dwcnn", (784, 784, 1568, 1568))):
        units = arch.build(name, 10)
        arch.check_units(units, 28)
        assert arch.layer_input_dims(units, 28) == expected_dims
        assert arch.n_weights(units) < 200_000  # under 1 MB of float32 weights


@pytest.mark.parametrize("architecture", ["cnn", "dwcnn"])
@pytest.mark.parametrize("method", ["lora-all", "dora", "adapter"])
def test_merged_and_folded_inference_equals_the_training_forward(architecture, method):
    """Inference merges LoRA / DoRA into the weights and folds BN in; training does neither."""
    trainer = trainer_for(architecture, method)  # adapters moved off their zero start
    x, labels = batch()
    probs, _ = trainer.forward_arrays(x, labels)["loss"]  # BN in inference mode: nothing trains it
    np.testing.assert_allclose(softmax(trainer.logits(x)), probs, rtol=1e-9, atol=1e-12)


def test_pretraining_learns_the_toy_task(toy_model):
    X, y = toy_images(100, seed=1)
    assert toy_model.accuracy(X, y) > 0.95


def test_save_load_round_trip_and_corruption(tmp_path, toy_model):
    path = tmp_path / "cnn.npz"
    digest = toy_model.save(path)
    again = CnnModel.load(path)
    assert again.weights_hash == digest and again.units == toy_model.units
    X, _ = toy_images(10)
    np.testing.assert_array_equal(again.logits(X), toy_model.logits(X))
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["W2"] = arrays["W2"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ModelFileError, match="do not match the stored hash"):
        CnnModel.load(path)
    arrays["W2"] = arrays["W2"][:3]
    np.savez(path, **arrays)
    with pytest.raises(ModelFileError, match="W2 has shape"):
        CnnModel.load(path)
    with pytest.raises(ModelFileError, match="not found"):
        CnnModel.load(tmp_path / "missing.npz")


def test_the_hash_covers_the_architecture(toy_model):
    full_taps = tuple(arch.Unit(**{**arch.to_json([u])[0], "tap_pool": 1}) for u in toy_model.units)
    # the same weights with other adapter inputs are another base model for adapters
    assert CnnModel(full_taps, toy_model.params, SIDE).weights_hash != toy_model.weights_hash


def test_skip2_lora_on_a_cnn_equals_skip_lora_and_recovers_a_drifted_task(toy_model):
    X, y = toy_images(120, seed=5)
    drifted = X.reshape(-1, SIDE, SIDE)[:, ::-1, ::-1].reshape(len(X), -1)  # rotated 180°
    before = toy_model.accuracy(drifted, y)
    methods = ("skip-lora", "skip2-lora", "skip2-lora-q4")
    runs = {m: run_cnn_method(toy_model, drifted, y, method=m, epochs=8, lr=0.05, batch_size=10,
                              seed=1) for m in methods}  # fmt: skip
    exact, cached = runs["skip-lora"].adapter, runs["skip2-lora"].adapter
    for a, b in zip(exact.effective_deltas(), cached.effective_deltas(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the cache changes nothing
    assert [A.shape[0] for A, _ in cached.factors] == list(toy_model.layer_input_dims)
    after = toy_model.accuracy(drifted, y, cached)
    assert after > max(before, 0.9)
    q4 = runs["skip2-lora-q4"]
    assert q4.cache_bytes * 6 < runs["skip2-lora"].cache_bytes
    assert evaluate(q4.trainer, toy_model, drifted, y) > 0.9


@pytest.mark.parametrize("name", ["cnn", "dwcnn"])
def test_architectures_refuse_shapes_that_do_not_chain(name):
    units = list(arch.build(name, 10))
    units[1] = arch.Unit(units[1].op, units[1].c_in + 1, units[1].c_out + (name == "dwcnn"))
    with pytest.raises(ValueError, match="takes"):
        arch.check_units(units, 28)
    with pytest.raises(ValueError, match="unknown CNN"):
        arch.build("resnet", 10)


def test_the_delta_methods_train_each_layers_delta_on_a_cnn(toy_model):
    """skip2-delta (what the federation asks devices for) on a CNN: ΔW_k itself, cache exact."""
    X, y = toy_images(80, seed=6)
    runs = [run_cnn_method(toy_model, X, y, method=m, epochs=3, lr=0.05, batch_size=10, seed=2)
            for m in ("skip-delta", "skip2-delta")]  # fmt: skip
    exact, cached = (r.adapter for r in runs)
    assert sorted(cached.to_arrays()) == ["delta1", "delta2", "delta3", "delta4"]
    for a, b in zip(exact.effective_deltas(), cached.effective_deltas(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bn1_pre_activations_are_the_first_convs_output_at_every_pixel(toy_model):
    from agent.trainer.cnn.model import CHUNK
    from agent.trainer.cnn.network import unit_forward

    X, _ = toy_images(CHUNK + 5)  # more than one chunk
    rows, mean, var = toy_model.bn1_pre_activations(X)
    first = arch.Unit(**{**arch.to_json(toy_model.units[:1])[0], "bn": False, "pool": None})
    direct, _ = unit_forward(first, 1, toy_model.images(toy_model.standardize(X)), toy_model.params)
    np.testing.assert_allclose(rows, direct.reshape(-1, direct.shape[-1]), rtol=1e-6, atol=1e-6)
    assert mean is toy_model.params["mean1"] and var is toy_model.params["var1"]


def test_a_cnns_drift_calibration_describes_its_last_tap_and_round_trips_outside_the_hash(
    tmp_path, toy_model
):
    from agent.drift_calibration import fit_calibration

    X, _ = toy_images(120, seed=2)
    calibration = fit_calibration(toy_model, X[:80], [X[80:]], window_rows=16, stride=8)
    assert calibration.width == toy_model.layer_input_dims[-1]  # the logits unit's input
    calibrated = toy_model.with_calibration(calibration)
    assert calibrated.weights_hash == toy_model.weights_hash  # adapters stay valid
    calibrated.save(tmp_path / "cnn.npz")
    again = CnnModel.load(tmp_path / "cnn.npz")
    np.testing.assert_array_equal(again.calibration.precision, calibration.precision)
    assert again.calibration.feature_threshold == calibration.feature_threshold
    toy_model.save(tmp_path / "bare.npz")
    assert CnnModel.load(tmp_path / "bare.npz").calibration is None
    with pytest.raises(ValueError, match="calibration of width"):
        tiny_model("dwcnn").with_calibration(calibration)
