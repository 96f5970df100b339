"""Pre-training a CNN, and fine-tuning it with any CNN method (the MLP's epoch loop and result).

The Skip methods run the MLP's SkipTrainer on the CNN's frozen features (one adapter per
layer, Skip-Cache dense or quantized); the others run CnnTrainer.
"""

from __future__ import annotations

import numpy as np

from agent.trainer.cnn import arch
from agent.trainer.cnn.backprop import CnnTrainer
from agent.trainer.cnn.methods import CnnMethod, resolve_cnn
from agent.trainer.cnn.model import CnnModel, init_cnn
from agent.trainer.finetune import FinetuneResult, check_run, check_training_data, train
from agent.trainer.skip import SkipTrainer

PRETRAIN_LR = 0.05


def make_cnn_trainer(model: CnnModel, method: CnnMethod, *, lr, rank, rng, n_samples,
                     batch_size, cache=None, start=None, capacity=None):  # fmt: skip
    if method.skip:
        layers = tuple(range(1, len(model.layer_input_dims) + 1))
        return SkipTrainer(model, layers=layers, lr=lr, rank=rank, rng=rng,
                           cache=cache or method.cache, start=start, n_samples=n_samples,
                           capacity=capacity, batch_size=batch_size,
                           delta=method.delta)  # fmt: skip
    if start is not None and not start.is_empty:
        raise ValueError(f"{method.name} cannot start from an adapter: only Skip-LoRA methods can")
    return CnnTrainer(model, method, lr=lr * method.lr_scale, rank=rank, rng=rng)


def run_cnn_method(model: CnnModel, X, y, *, method="skip2-lora", epochs=10, lr=0.05,
                   batch_size=20, rank=4, seed=0, cache=None, capacity=None, start=None,
                   cancel=None, progress=None, steps=None) -> FinetuneResult:  # fmt: skip
    """Fine-tune a CNN with any CNN method; `cache` overrides a Skip method's cache kind;
    `steps` (a budget of batches) replaces `epochs` when given."""
    spec = resolve_cnn(method)
    epochs = check_run(model, X, y, epochs=epochs, batch_size=batch_size, rank=rank, lr=lr,
                       steps=steps)  # fmt: skip
    rng = np.random.default_rng(seed)
    X1 = model.standardize(X)  # (n, side²): standardised pixels
    trainer = make_cnn_trainer(model, spec, lr=lr, rank=rank, rng=rng, n_samples=len(X),
                               batch_size=batch_size, cache=cache, start=start,
                               capacity=capacity)  # fmt: skip
    return train(trainer, X1, y, model.n_classes, epochs=epochs, batch_size=batch_size, rng=rng,
                 cancel=cancel, progress=progress, steps=steps)  # fmt: skip


def pretrain_cnn(X, y, n_classes: int, *, architecture="cnn", epochs=2, lr=PRETRAIN_LR,
                 batch_size=32, seed=0, side=28, units=None, info=None,
                 progress=None) -> CnnModel:  # fmt: skip
    """Train a CNN from scratch (every weight, BN in training mode) by SGD.

    `units` overrides the named architecture's (e.g. its Skip taps unpooled)."""
    rng = np.random.default_rng(seed)
    info = {"architecture": architecture, **dict(info or {})}
    units = units or arch.build(architecture, n_classes, side)
    model = init_cnn(units, rng, side, info)
    model.params["in_mean"] = np.array([X.mean()], dtype=np.float32)
    model.params["in_std"] = np.array([X.std() + 1e-6], dtype=np.float32)
    check_training_data(X, y, model.n_inputs, n_classes)
    trainer = CnnTrainer(model, resolve_cnn("ft-all"), lr=lr, rank=1, rng=rng)
    train(trainer, model.standardize(X), y, n_classes, epochs=epochs, batch_size=batch_size,
          rng=rng, progress=progress)  # fmt: skip
    return CnnModel(model.units, trainer.p, side, info)


def finetune_cnn(model: CnnModel, X, y, *, method="skip2-lora", epochs=10, lr=0.02,
                 batch_size=20, rank=4, seed=0, cache=None, start=None, cancel=None,
                 progress=None, steps=None) -> FinetuneResult:  # fmt: skip
    """What a CNN device runs: a Skip-LoRA-family fine-tune whose result is an adapter to ship."""
    if not resolve_cnn(method).is_adapter_only:
        raise ValueError(f"{method} changes the base model; a device ships Skip-LoRA adapters")
    return run_cnn_method(model, X, y, method=method, epochs=epochs, lr=lr, batch_size=batch_size,
                          rank=rank, seed=seed, cache=cache, start=start, cancel=cancel,
                          progress=progress, steps=steps)  # fmt: skip
