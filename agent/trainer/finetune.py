"""Training loops: pre-training a base model, and fine-tuning it with any of the methods.

`finetune` is what a device runs (the Skip-LoRA family, producing an adapter to ship);
`run_method` is what the benchmark runs for all eight methods, timing every phase.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from agent.trainer.adapter import Adapter
from agent.trainer.backprop import BackpropTrainer
from agent.trainer.errors import Cancelled
from agent.trainer.methods import MethodSpec, resolve
from agent.trainer.model import HIDDEN, BaseModel, init_params
from agent.trainer.skip import SkipTrainer

PHASES = ("forward", "backward", "update")


@dataclass
class PhaseTimes:
    """Seconds spent in each phase of a training step, summed over batches."""

    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    batches: int = 0

    def per_batch(self) -> dict:
        n = max(self.batches, 1)
        out = {phase: total / n for phase, total in self.seconds.items()}
        out["total"] = sum(out.values())
        return out


@dataclass
class FinetuneResult:
    adapter: Adapter | None  # None for methods that change the base weights
    trainer: object
    epochs_run: int
    seconds: float
    cpu_seconds: float
    samples: int
    times: PhaseTimes
    cache_hit_rate: float = 0.0
    cache_bytes: int = 0

    @property
    def steps(self) -> int:
        """SGD steps (batches) run."""
        return self.times.batches


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), n_classes), dtype=np.float32)  # (n, C)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def check_training_data(X, y, n_inputs: int, n_classes: int) -> None:
    if X.ndim != 2 or X.shape[1] != n_inputs:
        raise ValueError(f"training inputs must have shape (n, {n_inputs}), got {X.shape}")
    if y.shape != (len(X),):
        raise ValueError(f"labels must have shape ({len(X)},), got {y.shape}")
    if len(X) == 0:
        raise ValueError("no training samples")
    if not np.isfinite(X).all():
        raise ValueError("training inputs hold NaN or infinity")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}")


def epochs_for_steps(steps: int, n_samples: int, batch_size: int) -> int:
    """How many epochs a budget of `steps` batches takes (the last one may be partial)."""
    return math.ceil(steps / math.ceil(n_samples / batch_size))


def run_epochs(trainer, X1, labels, n_classes, *, epochs, batch_size, rng, cancel, progress,
               steps=None, drop_last=False):  # fmt: skip
    """The shared epoch loop: shuffle, then forward / backward / update per batch, timed.

    With `steps`, exactly that many batches run (the last epoch stops part-way) and `epochs`
    is not used. With `drop_last`, an epoch's last batch is skipped when it is not full (the
    next epoch's shuffle gives its rows another place). The loop keeps its own bookkeeping out
    of the timed phases (local names, sums written once per epoch): at a few µs a batch,
    dictionary updates would show in the figures.
    """
    onehot = one_hot(labels, n_classes)
    times, clock = PhaseTimes(), time.perf_counter
    n = len(X1)
    batches = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if drop_last and len(batches) > 1 and n % batch_size:
        batches.pop()
    if steps is not None:
        epochs = epochs_for_steps(steps, n, batch_size)
    forward, backward, update = trainer.forward, trainer.backward, trainer.update
    for epoch in range(epochs):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"cancelled after {epoch} of {epochs} epochs")
        t0 = clock()
        trainer.begin_epoch(X1, labels, onehot, rng.permutation(n))
        t3 = clock()
        fwd, bwd, upd = t3 - t0, 0.0, 0.0  # laying out the epoch is forward work
        todo = batches if steps is None else batches[: steps - times.batches]
        for start, stop in todo:
            t0 = t3  # a batch starts where the last one ended: one clock read less
            ctx = forward(start, stop)
            t1 = clock()
            grads = backward(ctx)
            t2 = clock()
            update(grads)
            t3 = clock()
            fwd += t1 - t0
            bwd += t2 - t1
            upd += t3 - t2
        seconds = times.seconds
        seconds["forward"] += fwd
        seconds["backward"] += bwd
        seconds["update"] += upd
        times.batches += len(todo)
        if progress is not None:
            progress(epoch + 1, epochs)
    return times


def make_trainer(model: BaseModel, spec: MethodSpec, cache: str, *, lr, rank, rng, n_samples,
                 batch_size, start=None, capacity=None):  # fmt: skip
    if spec.skip:
        return SkipTrainer(model, layers=spec.skip, lr=lr, rank=rank, rng=rng, cache=cache,
                           start=start, n_samples=n_samples, capacity=capacity,
                           batch_size=batch_size, delta=spec.delta)  # fmt: skip
    if start is not None and not start.is_empty:
        raise ValueError(f"{spec.name} cannot start from an adapter: only Skip-LoRA methods can")
    return BackpropTrainer(model.params, spec, lr=lr, rank=rank, rng=rng)


def run_method(model: BaseModel, X, y, *, method="skip2-lora", epochs=100, lr=0.05,
               batch_size=20, rank=4, seed=0, cache=None, capacity=None, start=None,
               cancel=None, progress=None, steps=None) -> FinetuneResult:  # fmt: skip
    """Fine-tune with any method; `cache` overrides the method's own cache kind; `steps`
    (a budget of batches) replaces `epochs` when given."""
    spec, default_cache = resolve(method)
    epochs = check_run(model, X, y, epochs=epochs, batch_size=batch_size, rank=rank, lr=lr,
                       steps=steps)  # fmt: skip
    rng = np.random.default_rng(seed)
    X1 = model.standardize(X)  # (n, N): x1, the first layer's input
    trainer = make_trainer(model, spec, cache or default_cache, lr=lr, rank=rank, rng=rng,
                           n_samples=len(X), batch_size=batch_size, start=start,
                           capacity=capacity)  # fmt: skip
    return train(trainer, X1, y, model.n_classes, epochs=epochs, batch_size=batch_size, rng=rng,
                 cancel=cancel, progress=progress, steps=steps)  # fmt: skip


def check_run(model, X, y, *, epochs, batch_size, rank, lr, steps=None) -> int:
    """Refuse bad data or settings; returns the epochs to run (`steps` decides, when given)."""
    check_training_data(X, y, model.n_inputs, model.n_classes)
    if epochs < 1 or batch_size < 1 or rank < 1 or not lr > 0:
        raise ValueError("epochs, batch_size and rank must be >= 1 and lr > 0")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return epochs if steps is None else epochs_for_steps(steps, len(X), batch_size)


def train(trainer, X1, y, n_classes, *, epochs, batch_size, rng, cancel=None, progress=None,
          steps=None) -> FinetuneResult:  # fmt: skip
    """Run the epochs of any trainer on standardised inputs X1, timed, into a FinetuneResult."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    times = run_epochs(trainer, X1, y, n_classes, epochs=epochs, batch_size=batch_size,
                       rng=rng, cancel=cancel, progress=progress, steps=steps)  # fmt: skip
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    is_skip = isinstance(trainer, SkipTrainer)
    return FinetuneResult(
        adapter=trainer.adapter() if is_skip else None,
        trainer=trainer,
        epochs_run=epochs,
        seconds=wall,
        cpu_seconds=cpu,
        samples=len(X1),
        times=times,
        cache_hit_rate=trainer.cache_hit_rate if is_skip else 0.0,
        cache_bytes=trainer.cache_bytes if is_skip else 0,
    )


def finetune(model: BaseModel, X, y, *, method="skip2-lora", epochs=100, lr=0.05, batch_size=20,
             rank=4, seed=0, cache=None, start=None, cancel=None, progress=None,
             steps=None) -> FinetuneResult:  # fmt: skip
    """What a device runs: a Skip-LoRA-family fine-tune whose result is an adapter to ship."""
    spec, _ = resolve(method)
    if not spec.is_adapter_only:
        raise ValueError(f"{method} changes the base model; a device ships Skip-LoRA adapters")
    return run_method(model, X, y, method=method, epochs=epochs, lr=lr, batch_size=batch_size,
                      rank=rank, seed=seed, cache=cache, start=start, cancel=cancel,
                      progress=progress, steps=steps)  # fmt: skip


def evaluate(trainer, model: BaseModel, X, y) -> float:
    """Accuracy of a trained method on (X, y), BN in inference mode."""
    logits = trainer.logits(model.standardize(X))
    return float((logits.argmax(axis=1) == y).mean())


def input_scale(X) -> np.ndarray:
    """Per-feature std for standardising the inputs, float32 (d,). A feature constant in
    pre-training (a pixel always blank) gets 1, not ~0: divided by 1e-6, any value a device
    sees there became ~1e7 after standardising and overflowed the logits (measured: a digit
    shifted by one pixel). The others keep std + 1e-6 (finite for near-constant ones)."""
    std = X.std(axis=0)  # (d,)
    return np.where(std > 0, std + 1e-6, 1.0).astype(np.float32)


def pretrain(X, y, n_classes: int, *, epochs=100, lr=0.05, batch_size=20, seed=0,
             info=None, progress=None, hidden: int = HIDDEN) -> BaseModel:  # fmt: skip
    """Train the base model from scratch (all layers, BN in training mode); `hidden` is the
    width of both hidden layers (the paper's 96)."""
    if hidden < 1:
        raise ValueError(f"the hidden width must be >= 1, got {hidden}")
    rng = np.random.default_rng(seed)
    params = init_params(X.shape[1], n_classes, rng, hidden=hidden)
    params["in_mean"] = X.mean(axis=0).astype(np.float32)
    params["in_std"] = input_scale(X)
    model = BaseModel(params, dict(info or {}))
    check_training_data(X, y, model.n_inputs, n_classes)
    spec, _ = resolve("ft-all")
    trainer = BackpropTrainer(params, spec, lr=lr, rank=1, rng=rng)
    # BN trains on batch statistics: a last batch of 2 near-identical rows (overlapping HAR
    # windows) has a variance near 0, 1/sqrt(var + eps) ~ 300, and its gradient wrecked FC1
    # (measured: 65 % training accuracy instead of 100 % for 5,582 rows). Full batches only.
    run_epochs(trainer, model.standardize(X), y, n_classes, epochs=epochs, batch_size=batch_size,
               rng=rng, cancel=None, progress=progress, drop_last=True)  # fmt: skip
    return BaseModel(trainer.p, dict(info or {}))
