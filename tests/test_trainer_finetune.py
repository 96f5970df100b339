"""Fine-tuning behaviour: Skip2 == Skip, caches, model files, adapters, errors."""

import threading

import numpy as np
import pytest

from agent.data.fan import load_fan_task
from agent.trainer.adapter import Adapter
from agent.trainer.cache import BoundedCache, DenseCache, QuantizedCache
from agent.trainer.errors import AdapterError, Cancelled, ModelFileError
from agent.trainer.finetune import evaluate, finetune, pretrain, run_epochs, run_method
from agent.trainer.methods import method_names
from agent.trainer.model import BaseModel
from agent.trainer.skip import SkipTrainer


@pytest.fixture(scope="module")
def fan(data_dir):
    return load_fan_task(data_dir, "damage1")


@pytest.fixture(scope="module")
def base(fan):
    return pretrain(fan.pretrain.X, fan.pretrain.y, 3, epochs=30, seed=0)


def test_skip2_lora_equals_skip_lora_with_the_same_seed(base, fan):
    """The cache is exact: skipping the frozen forward changes nothing but the time."""
    kwargs = dict(epochs=5, lr=0.05, seed=3)
    skip = run_method(base, fan.finetune.X, fan.finetune.y, method="skip-lora", **kwargs)
    skip2 = run_method(base, fan.finetune.X, fan.finetune.y, method="skip2-lora", **kwargs)
    for (a1, b1), (a2, b2) in zip(skip.adapter.factors, skip2.adapter.factors, strict=True):
        np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-7)
    assert skip2.cache_hit_rate == pytest.approx(4 / 5)  # epoch 1 fills, epochs 2..5 hit
    assert skip.cache_bytes == 0 and skip2.cache_bytes == 470 * (96 + 96 + 3) * 4


def test_skip2_lora_recovers_drifted_accuracy(base, fan):
    before = base.accuracy(fan.test.X, fan.test.y)
    result = finetune(base, fan.finetune.X, fan.finetune.y, epochs=30, lr=0.05, seed=0)
    after = base.accuracy(fan.test.X, fan.test.y, result.adapter)
    assert before < 0.8 and after > 0.9, (before, after)
    assert evaluate(result.trainer, base, fan.test.X, fan.test.y) == pytest.approx(after)


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_improves(base, fan, method):
    result = run_method(base, fan.finetune.X, fan.finetune.y, method=method, epochs=8, seed=1)
    accuracy = evaluate(result.trainer, base, fan.test.X, fan.test.y)
    assert accuracy > base.accuracy(fan.test.X, fan.test.y), method
    assert result.times.batches == 8 * 24 and result.times.per_batch()["total"] > 0


def test_quantized_caches_shrink_and_stay_close(base, fan):
    runs = {
        kind: run_method(base, fan.finetune.X, fan.finetune.y, method=kind, epochs=20, seed=2)
        for kind in ("skip2-lora", "skip2-lora-q8", "skip2-lora-q4")
    }
    dense = runs["skip2-lora"].cache_bytes
    assert dense / runs["skip2-lora-q8"].cache_bytes > 3.5
    assert dense / runs["skip2-lora-q4"].cache_bytes > 7.0
    accuracy = {k: evaluate(r.trainer, base, fan.test.X, fan.test.y) for k, r in runs.items()}
    assert abs(accuracy["skip2-lora-q4"] - accuracy["skip2-lora"]) <= 0.02, accuracy


def test_quantized_cache_round_trip_error_is_bounded():
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.random((50, 8)) * 3, rng.standard_normal((50, 3))], axis=1)
    rows = rows.astype(np.float32)
    for bits in (8, 4):
        cache = QuantizedCache(50, (4, 4), 3, bits)
        decoded = cache.store(np.arange(50), rows)
        hit, looked_up = cache.lookup(np.arange(50))
        assert hit.all() and np.array_equal(decoded, looked_up)
        for seg in (slice(0, 4), slice(4, 8)):  # half a step of each row's own scale
            step = rows[:, seg].max(axis=1, keepdims=True) / ((1 << bits) - 1)
            assert (np.abs(decoded[:, seg] - rows[:, seg]) <= step * 0.51 + 1e-6).all()
        np.testing.assert_allclose(decoded[:, 8:], rows[:, 8:], rtol=1e-3, atol=1e-3)


def test_bounded_cache_keeps_at_most_capacity_rows(base, fan):
    result = run_method(
        base, fan.finetune.X, fan.finetune.y, method="skip2-lora", cache="bounded",
        capacity=235, epochs=6, seed=0,
    )  # fmt: skip
    cache = result.trainer.cache
    assert isinstance(cache, BoundedCache) and cache.used == 235
    # epoch 1 misses everything, then half the samples hit in each of the 5 later epochs
    assert result.cache_hit_rate == pytest.approx(5 * 235 / (6 * 470))
    dense = run_method(base, fan.finetune.X, fan.finetune.y, method="skip2-lora", epochs=1)
    assert result.cache_bytes < dense.cache_bytes


def test_bounded_cache_trains_the_same_adapter_as_the_dense_one(base, fan):
    """Misses are recomputed, hits come from the cache: either way the rows are exact."""
    kwargs = dict(method="skip2-lora", epochs=4, seed=2)
    bounded = run_method(base, fan.finetune.X, fan.finetune.y, cache="bounded", capacity=100,
                         **kwargs)  # fmt: skip
    dense = run_method(base, fan.finetune.X, fan.finetune.y, **kwargs)
    for (a1, b1), (a2, b2) in zip(bounded.adapter.factors, dense.adapter.factors, strict=True):
        np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layers", [(2, 3), (3,)])
def test_skip_adapters_without_the_first_layer_train_with_every_cache(base, fan, layers):
    X1, y = base.standardize(fan.finetune.X), fan.finetune.y
    factors = {}
    for cache in ("none", "dense", "bounded", "q8"):
        rng = np.random.default_rng(4)
        trainer = SkipTrainer(base, layers=layers, lr=0.05, rank=4, rng=rng, cache=cache,
                              n_samples=len(X1), capacity=100)  # fmt: skip
        run_epochs(trainer, X1, y, 3, epochs=2, batch_size=20, rng=rng, cancel=None,
                   progress=None)  # fmt: skip
        factors[cache] = [f for f in trainer.adapter().factors if f is not None]
        assert len(factors[cache]) == len(layers)
    for cache in ("none", "bounded"):  # exact caches: the same adapter as the dense one
        for (a1, b1), (a2, b2) in zip(factors[cache], factors["dense"], strict=True):
            np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(b1, b2, rtol=1e-5, atol=1e-7)


def test_skip_head_step_is_exact_for_logits_near_the_float32_limit(base):
    """No max-subtraction, yet a logit of 84 (exp < FLT_MAX, 3·exp > FLT_MAX) steps right."""
    trainer = SkipTrainer(base, layers=(3,), lr=0.05, rank=4, rng=np.random.default_rng(0),
                          n_samples=1)  # fmt: skip
    head, C = trainer.head, 3
    logits = np.array([84.0, -1.0, -2.0], dtype=np.float32)
    x = np.zeros((1, head.W), np.float32)
    x[0, head.D :] = logits  # z alone: the adapter adds nothing while B = 0
    views = head.views(np.eye(C, dtype=np.float32)[[1]] * head.label_scale)[0]
    views.x[...] = x
    head.backward(head.forward(views))
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    step = views.g[0] * head.step[2].max()  # the step the update takes for these logits
    np.testing.assert_allclose(step, (p - np.eye(C)[1]) * 0.05, rtol=1e-6, atol=1e-12)


def test_overflow_replay_leaves_the_cache_hit_rate_alone(base, fan):
    X1, y = base.standardize(fan.finetune.X), fan.finetune.y
    rng = np.random.default_rng(0)
    trainer = SkipTrainer(base, lr=0.05, rank=4, rng=rng, cache="bounded", capacity=100,
                          n_samples=len(X1))  # fmt: skip
    run_epochs(trainer, X1, y, 3, epochs=2, batch_size=20, rng=rng, cancel=None, progress=None)
    before = (trainer.cache.stats.lookups, trainer.cache.stats.hits)
    trainer.head.theta[-1] = np.nan  # as if the last epoch had overflowed
    trainer.head.refresh()
    trainer.check_overflow()
    assert trainer.stable and np.isfinite(trainer.head.theta).all()
    assert (trainer.cache.stats.lookups, trainer.cache.stats.hits) == before


def test_skip_trainer_refuses_a_second_data_set(base, fan):
    X1, y = base.standardize(fan.finetune.X), fan.finetune.y
    onehot = np.eye(3, dtype=np.float32)[y]
    trainer = SkipTrainer(base, lr=0.05, rank=4, rng=np.random.default_rng(0), cache="dense",
                          n_samples=len(X1))  # fmt: skip
    trainer.begin_epoch(X1, y, onehot, np.arange(len(X1)))
    with pytest.raises(ValueError, match="one data set"):
        trainer.begin_epoch(X1.copy(), y, onehot, np.arange(len(X1)))


def test_skip_head_rejects_factors_of_the_wrong_shape(base):
    trainer = SkipTrainer(base, lr=0.05, rank=4, rng=np.random.default_rng(0), n_samples=40)
    factors = trainer.head.factors()
    wrong = [(A + 1, B + 1) for A, B in factors[:-1]] + [(factors[-1][0][:-1], factors[-1][1])]
    with pytest.raises(ValueError, match="do not fit"):
        trainer.head.assign(wrong)
    for (a1, b1), (a2, b2) in zip(trainer.head.factors(), factors, strict=True):  # untouched
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)


def test_skip_trainer_refuses_a_batch_of_another_size(base, fan):
    trainer = SkipTrainer(base, lr=0.05, rank=4, rng=np.random.default_rng(0), n_samples=40,
                          batch_size=20)  # fmt: skip
    X1 = base.standardize(fan.finetune.X[:40])
    y = fan.finetune.y[:40]
    trainer.begin_epoch(X1, y, np.eye(3, dtype=np.float32)[y], np.arange(40))
    with pytest.raises(ValueError, match="batch size 20"):
        trainer.forward(0, 10)


def test_dense_cache_look_up_reports_misses_then_hits():
    cache = DenseCache(4, 2)
    hit, _ = cache.lookup(np.array([0, 1]))
    assert not hit.any()
    cache.store(np.array([0, 1]), np.ones((2, 2), np.float32))
    hit, rows = cache.lookup(np.array([1, 2]))
    assert hit.tolist() == [True, False] and rows[0].tolist() == [1.0, 1.0]
    assert cache.stats.hit_rate == pytest.approx(1 / 4)


def test_overflowing_softmax_is_replayed_stably(base, fan):
    """Without the max-subtraction a huge adapter overflows exp: the epoch is redone stably."""
    rng = np.random.default_rng(0)
    trainer = SkipTrainer(base, lr=0.05, rank=4, rng=rng, cache="dense", n_samples=470)
    # finite factors, but B = 50 pushes logits far past exp's float32 range
    trainer.head.assign([(A, np.full_like(B, 50.0)) for A, B in trainer.head.factors()])
    X1 = base.standardize(fan.finetune.X)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        run_epochs(trainer, X1, fan.finetune.y, 3, epochs=2, batch_size=20, rng=rng,
                   cancel=None, progress=None)  # fmt: skip
        adapter = trainer.adapter()  # checks the last epoch too
    assert trainer.stable, "the first epoch must have overflowed"
    assert all(np.isfinite(a).all() and np.isfinite(b).all() for a, b in adapter.factors)


def test_model_save_load_round_trip_and_hash(tmp_path, base, fan):
    path = tmp_path / "base.npz"
    digest = base.save(path)
    loaded = BaseModel.load(path)
    assert loaded.weights_hash == digest == base.weights_hash
    np.testing.assert_array_equal(loaded.predict(fan.test.X), base.predict(fan.test.X))
    other = pretrain(fan.pretrain.X, fan.pretrain.y, 3, epochs=1, seed=9)
    assert other.weights_hash != digest


def test_model_load_errors(tmp_path, base):
    with pytest.raises(ModelFileError, match="not found"):
        BaseModel.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="not a skipfleet base model"):
        BaseModel.load(junk)
    tampered = BaseModel({k: v.copy() for k, v in base.params.items()}, base.info)
    path = tmp_path / "tampered.npz"
    tampered.save(path)
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["W2"] = arrays["W2"] + 1
    np.savez(path, **arrays)
    with pytest.raises(ModelFileError, match="do not match the stored hash"):
        BaseModel.load(path)
    arrays["W2"] = arrays["W2"][:5]
    np.savez(path, **arrays)
    with pytest.raises(ModelFileError, match="W2 has shape"):
        BaseModel.load(path)


def test_adapter_round_trip_and_validation(base, fan):
    result = finetune(base, fan.finetune.X, fan.finetune.y, epochs=3, seed=0)
    arrays = result.adapter.to_arrays()
    assert sorted(arrays) == ["A1", "A2", "A3", "B1", "B2", "B3"]
    again = Adapter.from_arrays(arrays, base.layer_input_dims, base.n_classes)
    np.testing.assert_array_equal(
        base.predict(fan.test.X, again), base.predict(fan.test.X, result.adapter)
    )
    with pytest.raises(AdapterError, match="A1 has shape"):
        Adapter.from_arrays({**arrays, "A1": arrays["A1"][:10]}, base.layer_input_dims, 3)
    with pytest.raises(AdapterError, match="NaN"):
        Adapter.from_arrays({**arrays, "B2": arrays["B2"] * np.nan}, base.layer_input_dims, 3)
    with pytest.raises(AdapterError, match="must come together"):
        Adapter.from_arrays({"A1": arrays["A1"]}, base.layer_input_dims, 3)
    with pytest.raises(AdapterError, match="unknown"):
        Adapter.from_arrays({"W9": arrays["A1"]}, base.layer_input_dims, 3)


def test_finetune_from_a_frozen_adapter_keeps_it(base, fan):
    """A device that already runs a fleet adapter trains new factors on top of it."""
    first = finetune(base, fan.finetune.X, fan.finetune.y, epochs=10, seed=0).adapter.frozen()
    second = finetune(base, fan.finetune.X, fan.finetune.y, epochs=1, lr=1e-9, start=first)
    assert second.adapter.deltas[0] is not None
    np.testing.assert_array_equal(
        base.predict(fan.test.X, second.adapter), base.predict(fan.test.X, first)
    )


def test_finetune_refuses_bad_input(base, fan):
    X, y = fan.finetune.X, fan.finetune.y
    with pytest.raises(ValueError, match="shape"):
        finetune(base, X[:, :10], y)
    with pytest.raises(ValueError, match="labels must lie"):
        finetune(base, X, y + 5)
    bad = X.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        finetune(base, bad, y)
    with pytest.raises(ValueError, match="changes the base model"):
        finetune(base, X, y, method="ft-all")
    with pytest.raises(ValueError, match="unknown method"):
        finetune(base, X, y, method="sgd")


def test_finetune_can_be_cancelled(base, fan):
    cancel = threading.Event()
    seen = []

    def progress(epoch, epochs):
        seen.append(epoch)
        if epoch == 2:
            cancel.set()

    with pytest.raises(Cancelled, match="after 2 of 50"):
        finetune(base, fan.finetune.X, fan.finetune.y, epochs=50, cancel=cancel, progress=progress)
    assert seen == [1, 2]


class BatchRecorder:
    """A trainer that only records the size of every batch it is given."""

    def __init__(self):
        self.sizes = []

    def begin_epoch(self, X1, labels, onehot, perm):
        pass

    def forward(self, start, stop):
        self.sizes.append(stop - start)

    def backward(self, ctx):
        return None

    def update(self, grads):
        pass


@pytest.mark.parametrize(("n", "drop_last", "sizes"), [
    (42, False, [20, 20, 2]), (42, True, [20, 20]), (40, True, [20, 20]), (7, True, [7]),
])  # fmt: skip
def test_drop_last_skips_only_a_partial_last_batch(n, drop_last, sizes):
    trainer = BatchRecorder()
    X, labels = np.zeros((n, 2), np.float32), np.zeros(n, np.int64)
    times = run_epochs(trainer, X, labels, 2, epochs=2, batch_size=20,
                       rng=np.random.default_rng(0), cancel=None, progress=None,
                       drop_last=drop_last)  # fmt: skip
    assert trainer.sizes == sizes * 2 and times.batches == 2 * len(sizes)
