"""SkipHead's fused arithmetic against the composed reference layers, computed in float64.

The head (float32, 11 NumPy calls a batch) must give the gradients of the paper's layers:
logits = z + Σ_k lora(x_k, A_k, B_k), softmax cross-entropy, mean over the batch. Checked at
rtol 1e-5 for every batch of an epoch (full ones and a short last one), on layer subsets, on
top of a frozen start adapter, and on the max-shifted (stable) softmax path.
"""

import numpy as np
import pytest

from agent.trainer import layers
from agent.trainer.adapter import Adapter
from agent.trainer.finetune import one_hot
from agent.trainer.model import BaseModel
from agent.trainer.skip import SkipTrainer
from tests.test_trainer_methods import N_CLASSES, N_IN, tiny_model

N_SAMPLES, BATCH = 11, 4  # batches of 4, 4 and a short 3
RTOL = 1e-5
LR = 2.0**-6  # a power of two: a step / LR is the head's gradient exactly
# float32 rounding leaves ~1e-7 absolute error on entries that cancel to near 0; a gradient
# 0.1 % wrong is off by ~1e-4 on these magnitudes, a thousand times this
ATOL = 1e-7


def start_adapter(model, seed=7):
    """A frozen adapter the device already runs: a delta on layer 1, factors on layer 3."""
    rng = np.random.default_rng(seed)
    d1, _, d3 = model.layer_input_dims
    delta1 = (0.3 * rng.standard_normal((d1, N_CLASSES))).astype(np.float32)
    factors3 = (rng.standard_normal((d3, 2)).astype(np.float32),
                (0.3 * rng.standard_normal((2, N_CLASSES))).astype(np.float32))  # fmt: skip
    return Adapter(model.layer_input_dims, N_CLASSES, (delta1, None, None),
                   (None, None, factors3))  # fmt: skip


def reference(model64, start, x1, labels, trained):
    """(loss, [(dA_k, dB_k)]) from the reference layers, in float64."""
    xs, z = model64.frozen_features(x1.astype(np.float64), standardized=True)
    if start is not None:
        for xk, delta in zip(xs, start.effective_deltas(), strict=True):
            if delta is not None:
                z = z + xk @ delta.astype(np.float64)
    logits, caches = z, []
    for k, (A, B) in trained.items():
        out, cache = layers.lora_forward(xs[k - 1], A.astype(np.float64), B.astype(np.float64))
        logits, caches = logits + out, [*caches, cache]
    loss, loss_cache = layers.softmax_xent_forward(logits, labels)
    dlogits = layers.softmax_xent_backward(loss_cache)
    return loss, [layers.lora_backward(dlogits, c, need_dx=False)[1:] for c in caches]


def trainer_with_factors(model, chosen, start, scale=0.3):
    """A Skip-LoRA trainer with B_k made non-zero, so that every dA_k is non-trivial."""
    trainer = SkipTrainer(model, layers=chosen, lr=LR, rank=2, rng=np.random.default_rng(5),
                          n_samples=N_SAMPLES, batch_size=BATCH, start=start)  # fmt: skip
    rng = np.random.default_rng(6)
    head = trainer.head
    head.assign([(A, (scale * rng.standard_normal(B.shape)).astype(np.float32))
                 for A, B in head.factors()])  # fmt: skip
    return trainer


def data(seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_SAMPLES, N_IN)).astype(np.float32)
    return X, rng.integers(0, N_CLASSES, N_SAMPLES), rng.permutation(N_SAMPLES)


def check_epoch(model, trainer, start, X, labels, perm):
    """Run one epoch batch by batch; each batch's steps must equal the reference gradients at
    the factors the head holds then, and the update must subtract exactly those steps."""
    model64 = BaseModel({k: v.astype(np.float64) for k, v in model.params.items()})
    x1 = model.standardize(X)
    trainer.begin_epoch(x1, labels, one_hot(labels, N_CLASSES), perm)
    head, sizes, largest = trainer.head, [], 0.0
    for start_row in range(0, N_SAMPLES, BATCH):
        stop = min(start_row + BATCH, N_SAMPLES)
        ids = perm[start_row:stop]
        before = dict(zip(trainer.layers, head.factors(), strict=True))
        views = trainer.backward(trainer.forward(start_row, stop))
        _, expected = reference(model64, start, x1[ids], labels[ids], before)
        steps = head.gradients()
        largest = max(largest, *(float(np.abs(g).max()) for pair in expected for g in pair))
        for k, (sA, sB), (rA, rB) in zip(trainer.layers, steps, expected, strict=True):
            np.testing.assert_allclose(sA / LR, rA, rtol=RTOL, atol=ATOL, err_msg=f"dA{k}")
            np.testing.assert_allclose(sB / LR, rB, rtol=RTOL, atol=ATOL, err_msg=f"dB{k}")
        trainer.update(views)
        for (A0, B0), (A1, B1), (sA, sB) in zip(before.values(), head.factors(), steps,
                                                strict=True):  # fmt: skip
            np.testing.assert_allclose(A1, A0 - sA, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(B1, B0 - sB, rtol=1e-6, atol=1e-7)
        sizes.append(len(ids))
    assert sizes == [BATCH, BATCH, N_SAMPLES - 2 * BATCH]  # full batches and a short last one
    assert largest > 0.1  # the gradients compared are not all (nearly) zero


@pytest.mark.parametrize("chosen", [(1, 2, 3), (3,), (1, 3), (2,)])
@pytest.mark.parametrize("with_start", [False, True], ids=["no-start", "start-adapter"])
def test_skip_head_gradients_equal_the_reference_layers_at_rtol_1e5(chosen, with_start):
    model = tiny_model(np.float32)
    start = start_adapter(model) if with_start else None
    trainer = trainer_with_factors(model, chosen, start)
    check_epoch(model, trainer, start, *data())
    assert not trainer.head.stable


@pytest.mark.parametrize("chosen", [(1, 2, 3), (2, 3)])
def test_stable_softmax_path_equals_the_reference_layers_at_rtol_1e5(chosen):
    """The max-shifted softmax the head switches to after an overflow gives the same gradients
    as the reference (which always shifts), also where the plain path overflows."""
    model = tiny_model(np.float32)
    start = start_adapter(model)
    X, labels, perm = data()
    plain = trainer_with_factors(model, chosen, start, scale=100.0)  # logits in the hundreds
    plain.begin_epoch(model.standardize(X), labels, one_hot(labels, N_CLASSES), perm)
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point here
        assert not np.isfinite(plain.forward(0, BATCH).g).all()  # exp overflows unshifted
    trainer = trainer_with_factors(model, chosen, start, scale=100.0)
    trainer.head.stable = True
    check_epoch(model, trainer, start, X, labels, perm)
