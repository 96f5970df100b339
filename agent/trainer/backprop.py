"""Fine-tuning by backpropagation: FT-All, FT-Last, FT-Bias, FT-All-LoRA, LoRA-All, LoRA-Last.

One step is split into `forward`, `backward` and `update` so the benchmark can time each
phase. Gradients stop at the lowest trained layer and only the gradients of trained
parameters are computed, as in the paper's comparison.
"""

from __future__ import annotations

import numpy as np

from agent.trainer import layers
from agent.trainer.methods import MethodSpec

BN_MOMENTUM = 0.1
LORA_INIT_SCALE = 1.0  # A ~ N(0, scale^2 / fan_in); B starts at zero so training starts at the base


def init_lora(dims_in_out, rank: int, rng: np.random.Generator, dtype=np.float32):
    """(A, B) for a layer of width N -> M: A small random, B zero (adapted model = base model)."""
    n, m = dims_in_out
    A = (rng.standard_normal((n, rank)) * (LORA_INIT_SCALE / np.sqrt(n))).astype(dtype)
    return A, np.zeros((rank, m), dtype=dtype)


class ShuffledBatches:
    """The epoch phases of a backprop trainer: one shuffled copy of the data an epoch, its
    batches views of it, each fed to the trainer's `forward_arrays(x, labels)`."""

    def begin_epoch(self, X1, labels, onehot, perm):
        self.x_epoch = X1[perm]  # (n, N) shuffled once per epoch; batches are views
        self.y_epoch = labels[perm]  # (n,)

    def forward(self, start, stop):
        return self.forward_arrays(self.x_epoch[start:stop], self.y_epoch[start:stop])


class BackpropTrainer(ShuffledBatches):
    """Trains a copy of the base parameters (and in-layer LoRA adapters) by SGD."""

    def __init__(self, params: dict, spec: MethodSpec, *, lr: float, rank: int, rng):
        self.spec = spec
        self.lr = np.float32(lr)
        self.p = {name: value.copy() for name, value in params.items()}
        self.lora = {
            k: init_lora(self.p[f"W{k}"].shape, rank, rng, self.p[f"W{k}"].dtype)
            for k in sorted(spec.lora)
        }  # k -> (A_k, B_k)

    # ------------------------------------------------------------------ phases
    def forward_arrays(self, x, labels):
        """x: standardised inputs (B, N). Returns the context backward needs."""
        p = self.p
        caches = {}
        h = x
        for k in (1, 2, 3):
            y, caches[f"fc{k}"] = layers.fc_forward(h, p[f"W{k}"], p[f"b{k}"])  # (B, M)
            if k in self.lora:
                ly, caches[f"lora{k}"] = layers.lora_forward(h, *self.lora[k])  # (B, M)
                y += ly
            if k < 3:
                y, caches[f"bn{k}"] = self._bn_forward(y, k)  # (B, 96)
                y, caches[f"relu{k}"] = layers.relu_forward(y)  # (B, 96)
            h = y
        # the loss value itself is not needed to train: only its gradient's inputs are kept
        caches["loss"] = (layers.softmax(h), labels)
        return caches

    def backward(self, caches):
        """Gradients of the trained parameters, multiplied by the step size."""
        spec = self.spec
        grads = {}
        # scaled by the step size once here, so every gradient below is already a step
        g = layers.softmax_xent_backward(caches["loss"]) * self.lr  # (B, C)
        for k in range(3, spec.lowest_trained_layer - 1, -1):
            if k < 3:
                g = layers.relu_backward(g, caches[f"relu{k}"])  # (B, 96)
                g = self._bn_backward(g, caches[f"bn{k}"], k, grads)  # (B, 96)
            need_dx = k > spec.lowest_trained_layer
            trains_w = k in spec.train_weights
            dx, dW, db = layers.fc_backward(
                g,
                caches[f"fc{k}"],
                need_dx=need_dx,
                need_dW=trains_w,
                need_db=trains_w or k in spec.train_bias,
            )
            if dW is not None:
                grads[f"W{k}"] = dW
            if db is not None:
                grads[f"b{k}"] = db
            if k in self.lora:
                dxl, grads[f"A{k}"], grads[f"B{k}"] = layers.lora_backward(
                    g, caches[f"lora{k}"], need_dx=need_dx
                )
                if need_dx:
                    dx += dxl
            g = dx
        return grads

    def update(self, grads):
        for name, grad in grads.items():
            if name[0] in "AB" and name[1:].isdigit():
                A, B = self.lora[int(name[1:])]
                target = A if name[0] == "A" else B
            else:
                target = self.p[name]
            target -= grad  # grads arrive scaled by the step size

    def step(self, x, labels):
        self.update(self.backward(self.forward_arrays(x, labels)))

    # ------------------------------------------------------------- inference
    def logits(self, x):
        """Inference-mode logits (BN with running statistics) of standardised inputs."""
        p = self.p
        h = x
        for k in (1, 2, 3):
            y, _ = layers.fc_forward(h, p[f"W{k}"], p[f"b{k}"])
            if k in self.lora:
                y += layers.lora_forward(h, *self.lora[k])[0]
            if k < 3:
                y, _ = layers.bn_infer_forward(
                    y, p[f"gamma{k}"], p[f"beta{k}"], p[f"mean{k}"], p[f"var{k}"]
                )
                y, _ = layers.relu_forward(y)
            h = y
        return h

    @property
    def trainable_params(self) -> int:
        spec, p = self.spec, self.p
        count = sum(p[f"W{k}"].size + p[f"b{k}"].size for k in spec.train_weights)
        count += sum(p[f"b{k}"].size for k in spec.train_bias - spec.train_weights)
        count += sum(p[f"gamma{k}"].size + p[f"beta{k}"].size for k in spec.bn_train)
        count += sum(A.size + B.size for A, B in self.lora.values())
        return count

    # -------------------------------------------------------------------- BN
    def _bn_forward(self, y, k):
        p = self.p
        if k not in self.spec.bn_train:  # frozen layer: BN in inference mode
            return layers.bn_infer_forward(
                y, p[f"gamma{k}"], p[f"beta{k}"], p[f"mean{k}"], p[f"var{k}"]
            )
        out, cache = layers.bn_train_forward(y, p[f"gamma{k}"], p[f"beta{k}"])
        _, _, _, mean, var = cache
        p[f"mean{k}"] += BN_MOMENTUM * (mean - p[f"mean{k}"])
        p[f"var{k}"] += BN_MOMENTUM * (var - p[f"var{k}"])
        return out, cache

    def _bn_backward(self, g, cache, k, grads):
        if k not in self.spec.bn_train:
            return layers.bn_infer_backward(g, cache)
        dx, grads[f"gamma{k}"], grads[f"beta{k}"] = layers.bn_train_backward(g, cache)
        return dx
