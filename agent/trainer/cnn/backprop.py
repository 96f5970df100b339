"""Fine-tuning a CNN by backpropagation: FT-All, FT-Last, LoRA-Last, LoRA-All, DoRA, GaLore and
bottleneck adapters.

One step is `forward`, `backward`, `update` like the MLP's BackpropTrainer. Every trained thing
has a position (unit u, or u + ½ for the adapter on unit u's output); the backward pass stops at
the lowest one, computes dx only above it and only the gradients of what trains. Units below
it keep no forward cache either: their activations are never needed again.
"""

from __future__ import annotations

import numpy as np

from agent.trainer import layers
from agent.trainer.backprop import BN_MOMENTUM, ShuffledBatches, init_lora
from agent.trainer.cnn import peft
from agent.trainer.cnn.methods import ADAPTER, CnnMethod
from agent.trainer.cnn.model import CHUNK, CnnModel
from agent.trainer.cnn.network import (
    FROZEN,
    UnitMods,
    batch_statistics,
    folded,
    unit_backward,
    unit_forward,
    unit_infer,
)
from agent.trainer.cnn.optim import make_optimizer


class CnnTrainer(ShuffledBatches):
    def __init__(self, model: CnnModel, method: CnnMethod, *, lr, rank, rng):
        self.model, self.method, self.units = model, method, model.units
        n = len(self.units)
        self.placement = method.placement(self.units)
        self.train_units = self.placement.weights
        self.p = dict(model.params)  # frozen arrays are shared; trained ones copied below
        self.trainable: dict[str, np.ndarray] = {}
        for u in self.train_units:
            names = [f"W{u}", f"b{u}"]
            names += [f"{p}{u}" for p in ("gamma", "beta")] if self._bn_trains(u) else []
            for name in names:
                self.p[name] = self.trainable[name] = model.params[name].copy()
            if self._bn_trains(u):  # running statistics move with the batches
                self.p[f"mean{u}"] = model.params[f"mean{u}"].copy()
                self.p[f"var{u}"] = model.params[f"var{u}"].copy()
        self.mods = {u: self._mods(u, rank, rng) for u in range(1, n + 1)}
        self.adapters = self._bottlenecks(rank, rng)
        self.lowest = self.placement.lowest
        self.optimizer = make_optimizer(method.optimizer, self.trainable, lr=lr, rank=rank)
        self.scale_loss = np.float32(lr) if method.optimizer == "sgd" else np.float32(1.0)

    def _bn_trains(self, u) -> bool:
        return self.method.bn_train and self.units[u - 1].bn

    def _mods(self, u, rank, rng) -> UnitMods:
        where = self.placement
        W = self.model.params[f"W{u}"]
        if u in where.lora or u in where.dora:
            A, B = init_lora(W.shape, rank, rng, W.dtype)
            self.trainable[f"A{u}"], self.trainable[f"B{u}"] = A, B
            if u in where.lora:
                return UnitMods(lora=(A, B))
            magnitude = peft.dora_init_magnitude(W)
            self.trainable[f"m{u}"] = magnitude
            return UnitMods(dora=(A, B, magnitude))
        return UnitMods(bn_train=self._bn_trains(u)) if u in self.train_units else FROZEN

    def _bottlenecks(self, width, rng):
        """A bottleneck adapter (width `rank`) where the placement puts one."""
        out = {}
        for u in self.placement.adapters:
            c, dtype = self.units[u - 1].c_out, self.model.params["W1"].dtype  # unit u's output
            down = (rng.standard_normal((c, width)) * np.sqrt(2.0 / c)).astype(dtype)
            # W_up = 0: the adapted model starts as the base model
            arrays = (down, np.zeros(width, dtype), np.zeros((width, c), dtype), np.zeros(c, dtype))
            for name, array in zip(("Wd", "bd", "Wu", "bu"), arrays, strict=True):
                self.trainable[f"{name}{u}"] = array
            out[u] = arrays
        return out

    # ------------------------------------------------------------------ phases
    def forward_arrays(self, x, labels):
        """x: standardised pixel rows (B, N). Returns the caches backward needs."""
        h, caches = self.model.images(x), []
        for u, unit in enumerate(self.units, start=1):
            h, unit_cache = unit_forward(unit, u, h, self.p, self.mods[u])
            if self.mods[u].bn_train:
                self._fold_statistics(u, unit_cache)
            adapter_cache = None
            if u in self.adapters:
                h, adapter_cache = adapter_forward(h, self.adapters[u])
            # below the lowest trained position nothing is ever differentiated: keep nothing
            keep = u >= self.lowest
            caches.append((unit_cache if keep else None, adapter_cache))
        return {"units": caches, "loss": (layers.softmax(h), labels)}

    def _fold_statistics(self, u, unit_cache):
        mean, var = batch_statistics(unit_cache)
        self.p[f"mean{u}"] += BN_MOMENTUM * (mean - self.p[f"mean{u}"])
        self.p[f"var{u}"] += BN_MOMENTUM * (var - self.p[f"var{u}"])

    def backward(self, ctx):
        """Gradients of the trained parameters (× the step size for SGD, as the MLP's)."""
        grads = {}
        g = layers.softmax_xent_backward(ctx["loss"]) * self.scale_loss  # (B, C)
        for u in range(len(self.units), 0, -1):
            unit_cache, adapter_cache = ctx["units"][u - 1]
            if adapter_cache is not None:
                g = adapter_backward(g, adapter_cache, u, grads, need_dx=u + ADAPTER > self.lowest)
            if u < self.lowest:
                break
            g, unit_grads = unit_backward(
                self.units[u - 1], u, g, unit_cache, self.mods[u], need_dx=u > self.lowest,
                need_W=u in self.train_units, need_b=u in self.train_units,
            )  # fmt: skip
            grads.update(unit_grads)
        return grads

    def update(self, grads):
        self.optimizer.step(self.trainable, grads)

    def step(self, x, labels):
        self.update(self.backward(self.forward_arrays(x, labels)))

    # ------------------------------------------------------------- inference
    def logits(self, x):
        """Inference-mode logits of standardised pixel rows: LoRA / DoRA merged into the
        weights and BN (running statistics) folded in, as a device would deploy them."""
        weights = [folded(unit, u, self.p, self.mods[u]) for u, unit in enumerate(self.units, 1)]
        chunks = range(0, len(x), CHUNK)
        return np.concatenate([self._logits(x[i : i + CHUNK], weights) for i in chunks])

    def _logits(self, x, weights):
        h = self.model.images(x)
        for u, (unit, (W, b)) in enumerate(zip(self.units, weights, strict=True), start=1):
            h = unit_infer(unit, h, W, b)
            if u in self.adapters:
                h, _ = adapter_forward(h, self.adapters[u])
        return h

    @property
    def trainable_params(self) -> int:
        return sum(a.size for a in self.trainable.values())


# --------------------------------------------- a bottleneck adapter on a feature map's pixels
def adapter_forward(h, arrays):
    out, cache = peft.bottleneck_forward(h.reshape(-1, h.shape[-1]), *arrays)  # rows (n, C)
    return out.reshape(h.shape), (cache, h.shape)


def adapter_backward(g, cache, u, grads, *, need_dx):
    bottleneck_cache, shape = cache
    dx, *parts = peft.bottleneck_backward(
        g.reshape(-1, shape[-1]), bottleneck_cache, need_dx=need_dx
    )
    for name, grad in zip(("Wd", "bd", "Wu", "bu"), parts, strict=True):
        grads[f"{name}{u}"] = grad
    return dx.reshape(shape) if need_dx else None
