"""Analytic FLOPs of one training batch of each method (the method's own work).

Counted from the paper's notation (§1): a product of (B × N) by (N × M) is 2BNM FLOPs, an
element-wise operation one FLOP per element. Skip2-LoRA's frozen forward runs once per
sample, so over E epochs it adds 1/E of a frozen forward to each batch. This counts what the
method must compute, not how an implementation lays it out (the fused Skip head in
`skip.py` does some extra multiply-by-zero work that is not counted here).
"""

from __future__ import annotations

from agent.trainer.methods import MethodSpec


def _fc(batch, n, m):
    return 2 * batch * n * m + batch * m  # x W + b


def _lora_forward(batch, n, m, rank):
    return 2 * batch * n * rank + 2 * batch * rank * m + batch * m  # (x A) B, added


def _lora_backward(batch, n, m, rank, need_dx):
    flops = 2 * batch * rank * m + 2 * batch * m * rank + 2 * batch * n * rank  # dB, du, dA
    return flops + (2 * batch * rank * n + batch * n if need_dx else 0)


def _bn(batch, width, train):
    return (7 if train else 3) * batch * width


def frozen_forward(batch, dims, n_classes):
    """FC1 → BN → ReLU → FC2 → BN → ReLU → FC3, BN in inference mode."""
    n, h1, h2 = dims
    flops = _fc(batch, n, h1) + _bn(batch, h1, False) + batch * h1
    flops += _fc(batch, h1, h2) + _bn(batch, h2, False) + batch * h2
    return flops + _fc(batch, h2, n_classes)


def softmax_xent(batch, n_classes):
    return 5 * batch * n_classes  # shift, exp, sum, divide, subtract the one-hot


def backprop_batch(spec: MethodSpec, batch, dims, n_classes, rank):
    widths = [*dims[1:], n_classes]  # output width of layer k
    forward = softmax_xent(batch, n_classes)
    backward = 0
    for k in (1, 2, 3):
        n, m = dims[k - 1], widths[k - 1]
        forward += _fc(batch, n, m) + (_lora_forward(batch, n, m, rank) if k in spec.lora else 0)
        if k < 3:
            forward += _bn(batch, m, k in spec.bn_train) + batch * m
        if k < spec.lowest_trained_layer:
            continue
        need_dx = k > spec.lowest_trained_layer
        if k < 3:  # ReLU and BN backward
            backward += batch * m + (11 * batch * m if k in spec.bn_train else batch * m)
        backward += 2 * batch * m * n if need_dx else 0
        backward += 2 * batch * n * m if k in spec.train_weights else 0
        backward += batch * m if (k in spec.train_weights or k in spec.train_bias) else 0
        if k in spec.lora:
            backward += _lora_backward(batch, n, m, rank, need_dx)
    return forward, backward


def _delta_forward(batch, n, m):
    return 2 * batch * n * m + batch * m  # x ΔW, added


def _delta_backward(batch, n, m):
    return 2 * batch * n * m  # dΔW = xᵀ dy


def skip_batch(spec: MethodSpec, batch, dims, n_classes, rank, epochs):
    adapters = [dims[k - 1] for k in spec.skip]
    if spec.delta:  # ΔW_k trained directly (delta_head.py)
        forward = sum(_delta_forward(batch, d, n_classes) for d in adapters)
        backward = sum(_delta_backward(batch, d, n_classes) for d in adapters)
    else:
        forward = sum(_lora_forward(batch, d, n_classes, rank) for d in adapters)
        backward = sum(_lora_backward(batch, d, n_classes, rank, False) for d in adapters)
    forward += softmax_xent(batch, n_classes)
    frozen = frozen_forward(batch, dims, n_classes)
    forward += frozen / epochs if spec.cache else frozen  # Skip-Cache: once per sample
    return forward, backward


def flops_per_batch(spec: MethodSpec, *, batch, dims, n_classes, rank, epochs, trainable):
    """Forward + backward + update FLOPs of one batch (update: scale and subtract)."""
    if spec.skip:
        forward, backward = skip_batch(spec, batch, dims, n_classes, rank, epochs)
    else:
        forward, backward = backprop_batch(spec, batch, dims, n_classes, rank)
    return int(forward + backward + 2 * trainable)
