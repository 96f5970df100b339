"""Analytic FLOPs of one training batch of each CNN method, split three ways.

The MLP's counting rules (`agent/trainer/flops.py`: a (B × N)(N × M) product is 2BNM, an
element-wise operation one FLOP per element) applied unit by unit: a conv is an FC on B·H·W
patch rows of width 9·C_in, a pointwise conv an FC on B·H·W pixel rows, a depthwise conv 2·9
per output element. Max pooling is 3 comparisons per output, a Skip tap's average pooling one
addition per input. The split:
- forward: everything the method computes before the loss gradient (the Skip methods' frozen
  forward once per sample with the cache: 1/E of it per batch over E epochs);
- backward: everything after it, input gradients included;
- trainable: the part of backward that computes gradients of trained parameters, plus the
  update itself (SGD: 2 per parameter; Adam: 10 per state entry, GaLore's projections and its
  SVD every T steps on top). What a model update costs beyond running and backpropagating the
  network: the PEFT study's "FLOPs of an update".
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.trainer.cnn import arch
from agent.trainer.cnn.methods import ADAPTER, CnnMethod
from agent.trainer.cnn.optim import GALORE_UPDATE_EVERY
from agent.trainer.flops import _bn, _fc, _lora_backward, _lora_forward, softmax_xent

ADAM_PER_ENTRY = 10  # two moments, bias corrections, sqrt, divide, step
TAPS = arch.KERNEL * arch.KERNEL


@dataclass
class Flops:
    forward: float = 0.0
    backward: float = 0.0
    trainable: float = 0.0  # the parameter-gradient part of backward, plus the update
    update: float = 0.0

    @property
    def total(self) -> int:
        return int(self.forward + self.backward + self.update)


def unit_shapes(units, side: int, batch: int):
    """Per unit: (rows of its op, N, M, input elements, output elements before pooling)."""
    out, h = [], side
    for unit in units:
        if unit.op == "fc":
            rows, h_in = batch, 1
        else:
            rows, h_in = batch * h * h, h
        n, m = unit.weight_shape()
        n = unit.c_in if unit.op == "dw" else n
        out.append((rows, n, m, rows * unit.c_in if unit.op != "fc" else batch * unit.c_in,
                    rows * unit.c_out))  # fmt: skip
        if unit.op != "fc":
            h = h_in // 2 if unit.pool == "max" else h_in
    return out


def _pool(unit, elements):
    return 3 * elements / 4 if unit.pool == "max" else 0


def frozen_forward(units, side: int, batch: int) -> float:
    """Every unit in inference mode, plus the average pooling of pooled Skip taps."""
    total = 0.0
    for unit, (rows, n, m, inputs, outputs) in zip(units, unit_shapes(units, side, batch),
                                                   strict=True):  # fmt: skip
        total += _op_forward(unit, rows, n, m)
        if unit.bn:
            total += _bn(rows, m, False) + outputs  # BN, ReLU
        total += _pool(unit, outputs)
        total += inputs if unit.starts_layer and unit.tap_pool > 1 else 0
    return total


def _op_forward(unit, rows, n, m):
    if unit.op == "dw":
        return 2 * TAPS * rows * m + rows * m
    return _fc(rows, n, m)


def method_flops(units, side: int, method: CnnMethod, *, batch, rank, epochs,
                 trainable_params: int) -> Flops:  # fmt: skip
    if method.skip:
        return skip_flops(units, side, method, batch=batch, rank=rank, epochs=epochs,
                          trainable_params=trainable_params)  # fmt: skip
    return backprop_flops(units, side, method, batch=batch, rank=rank,
                          trainable_params=trainable_params)  # fmt: skip


def skip_flops(units, side, method, *, batch, rank, epochs, trainable_params) -> Flops:
    dims, C = arch.layer_input_dims(units, side), units[-1].c_out
    frozen = frozen_forward(units, side, batch)
    f = Flops()
    f.forward = sum(_lora_forward(batch, d, C, rank) for d in dims) + softmax_xent(batch, C)
    f.forward += frozen / epochs if method.cache != "none" else frozen
    f.backward = f.trainable = sum(_lora_backward(batch, d, C, rank, False) for d in dims)
    f.update = 2 * trainable_params
    f.trainable += f.update
    return f


def backprop_flops(units, side, method, *, batch, rank, trainable_params) -> Flops:
    where = method.placement(units)
    train, lora, dora, adapters = where.weights, where.lora, where.dora, where.adapters
    lowest = where.lowest
    f = Flops(forward=softmax_xent(batch, units[-1].c_out))
    shapes = unit_shapes(units, side, batch)
    for u, (unit, (rows, n, m, _, outputs)) in enumerate(zip(units, shapes, strict=True), 1):
        bn_train = method.bn_train and unit.bn and u in train
        f.forward += _op_forward(unit, rows, n, m) + _pool(unit, outputs)
        f.forward += _bn(rows, m, bn_train) + outputs if unit.bn else 0
        f.forward += _adapt_forward(unit, rows, n, m, rank, u in lora, u in dora)
        pooled_rows = rows // 4 if unit.pool == "max" else rows
        if u in adapters:
            f.forward += _bottleneck_forward(pooled_rows, m, rank)
        if u in adapters:  # every adapter trains: none is below the lowest position
            grads = _bottleneck_param_grads(pooled_rows, m, rank)
            f.backward += grads + (2 * pooled_rows * rank * m + pooled_rows * m
                                   if u + ADAPTER > lowest else 0)  # fmt: skip
            f.trainable += grads
        if u < lowest:
            continue
        f.backward += outputs * (1 if unit.pool else 0) + (outputs if unit.bn else 0)
        f.backward += (11 if bn_train else 1) * outputs if unit.bn else 0
        f.trainable += 2 * outputs if bn_train else 0  # dgamma, dbeta
        need_dx = u > lowest
        f.backward += _dx(unit, rows, n, m) if need_dx else 0
        param = _param_grads(unit, rows, n, m, rank, u in train, u in lora, u in dora, need_dx)
        f.backward += param
        f.trainable += param
    f.update = _update(units, method, rank, trainable_params)
    f.trainable += f.update
    return f


def _adapt_forward(unit, rows, n, m, rank, lora, dora):
    if not (lora or dora):
        return 0
    if unit.op == "dw":  # merged kernel W0 + A B; DoRA adds the norms and the column scale
        return 2 * TAPS * rank * m + TAPS * m + (4 * TAPS * m if dora else 0)
    if lora:
        return _lora_forward(rows, n, m, rank)
    # DoRA rows form: x A, (x A) B added, V = W0 + A B, its column norms, the column scale
    return _lora_forward(rows, n, m, rank) + 2 * n * rank * m + n * m + 2 * n * m + 2 * rows * m


def _dx(unit, rows, n, m):
    if unit.op == "dw":
        return 2 * TAPS * rows * m
    return 2 * rows * m * n


def _param_grads(unit, rows, n, m, rank, train, lora, dora, need_dx):
    """FLOPs of the gradients of unit u's trained parameters (LoRA/DoRA: their dx share too)."""
    flops = 0
    if unit.op == "dw":
        dense = 2 * TAPS * rows * m  # dW of the (merged) kernel
        flops += dense + rows * m if train else 0
        if lora or dora:
            flops += dense + 4 * TAPS * rank * m + (6 * TAPS * m if dora else 0)
        return flops
    if train:
        flops += 2 * rows * n * m + rows * m  # dW, db
    if lora:
        flops += _lora_backward(rows, n, m, rank, need_dx)
    if dora:
        flops += _lora_backward(rows, n, m, rank, need_dx) + 5 * rows * m + 3 * n * m
        flops += 4 * n * m * rank  # the norm's path into A and B
    return flops


def _bottleneck_forward(rows, c, width):
    return 2 * _fc(rows, c, width) + 2 * rows * width + rows * c  # down, ReLU, up, residual


def _bottleneck_param_grads(rows, c, width):
    up = 2 * width * rows * c + rows * c  # dW_up, db_up
    through = 2 * rows * c * width + rows * width  # into the bottleneck, through its ReLU
    down = 2 * c * rows * width + rows * width  # dW_down, db_down
    return up + through + down


def _update(units, method, rank, trainable_params):
    if method.optimizer == "sgd":
        return 2 * trainable_params
    if method.optimizer == "adam":
        return ADAM_PER_ENTRY * trainable_params
    # GaLore: Adam in the projected space, projecting down and back, an SVD every T steps
    total = 0.0
    for unit in units:
        n, m = unit.weight_shape()
        projected = method.optimizer == "galore" and min(n, m) > rank
        if projected:
            small, big = min(n, m), max(n, m)
            svd = 4 * small * small * big + 8 * small**3  # thin SVD, Golub-Reinsch estimate
            total += ADAM_PER_ENTRY * rank * big + 2 * 2 * small * rank * big + n * m
            total += svd / GALORE_UPDATE_EVERY
        else:
            total += ADAM_PER_ENTRY * n * m
        total += ADAM_PER_ENTRY * unit.c_out * (3 if unit.bn else 1)  # b, gamma, beta
    return total
