"""One CNN unit forward and back (weighted op, BN, ReLU, pooling), for inference and training.

A conv, pointwise or FC op is the MLP's FC on rows (patches, pixels or flattened maps), so
LoRA and DoRA take their rows form there; a depthwise op takes the merged form (peft.py).
`need_*` flags carry the method's choice of gradients down to the layer functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.trainer import layers
from agent.trainer.cnn import layers as cl
from agent.trainer.cnn import peft
from agent.trainer.cnn.arch import KERNEL, Unit


@dataclass(frozen=True)
class UnitMods:
    """What adapts one unit's weight: LoRA (A, B) or DoRA (A, B, m), and whether BN trains."""

    lora: tuple | None = None
    dora: tuple | None = None
    bn_train: bool = False


FROZEN = UnitMods()


# --------------------------------------------------------------------- rows of the op
def to_rows(unit: Unit, h):
    if unit.op == "conv":
        return cl.im2col(h, KERNEL)  # (B·H·W, K·C)
    if unit.op == "pw":
        return h.reshape(-1, h.shape[-1])  # (B·H·W, C)
    return h.reshape(len(h), -1)  # (B, N): an FC flattens a feature map


def from_rows(unit: Unit, drows, h_shape):
    if unit.op == "conv":
        return cl.col2im(drows, h_shape, KERNEL)  # (B, H, W, C)
    return drows.reshape(h_shape)


# ------------------------------------------------------------------------------ forward
def unit_forward(unit: Unit, u: int, h, p, mods: UnitMods = FROZEN):
    """(output, cache) of unit u on h; BN in inference mode unless mods.bn_train."""
    W, b = p[f"W{u}"], p[f"b{u}"]
    if unit.op == "dw":
        merge = None
        if mods.lora is not None:
            W, merge = peft.lora_merge(W, *mods.lora)  # (K, C)
        elif mods.dora is not None:
            W, merge = peft.dora_merge(W, *mods.dora)  # (K, C)
        y, op_cache = cl.depthwise_forward(h, W, b, KERNEL)  # (B, H, W, C)
        op_cache = (op_cache, merge)
    else:
        rows = to_rows(unit, h)  # (n, N)
        lora_cache = None
        if mods.dora is not None:
            y, fc_cache = peft.dora_forward(rows, W, *mods.dora, b)  # (n, M)
        else:
            y, fc_cache = layers.fc_forward(rows, W, b)  # (n, M)
            if mods.lora is not None:
                ly, lora_cache = layers.lora_forward(rows, *mods.lora)  # (n, M)
                y += ly
        out_shape = (*h.shape[:-1], unit.c_out) if unit.op != "fc" else (len(h), unit.c_out)
        y = y.reshape(out_shape)  # (B, H, W, M) or (B, M)
        op_cache = (fc_cache, lora_cache, h.shape)
    caches = {"op": op_cache}
    if unit.bn:
        y, caches["bn"] = _bn_forward(y, u, p, mods.bn_train)
        y, caches["relu"] = layers.relu_forward(y)
    if unit.pool == "max":
        y, caches["pool"] = cl.maxpool_forward(y)  # (B, H/2, W/2, M)
    return y, caches


def _bn_forward(y, u, p, train):
    if train:  # batch statistics; the caller folds them into the running ones
        return cl.bn2d_train_forward(y, p[f"gamma{u}"], p[f"beta{u}"])
    args = (p[f"gamma{u}"], p[f"beta{u}"], p[f"mean{u}"], p[f"var{u}"])
    return layers.bn_infer_forward(y, *args)  # broadcasts over (B, H, W, C) and (B, C)


def batch_statistics(caches):
    """(mean, var) of the batch a training-mode BN normalised with."""
    (_, _, _, mean, var), _ = caches["bn"]
    return mean, var


# ------------------------------------------------------- inference with BN folded in
def merged(u: int, p, mods: UnitMods = FROZEN):
    """Unit u's weight with its LoRA or DoRA adapter merged in (as deployed: no extra cost)."""
    W = p[f"W{u}"]
    if mods.lora is not None:
        return peft.lora_merge(W, *mods.lora)[0]
    if mods.dora is not None:
        return peft.dora_merge(W, *mods.dora)[0]
    return W


def folded(unit: Unit, u: int, p, mods: UnitMods = FROZEN):
    """(W', b') of unit u, adapters merged and its inference-mode BN folded in:
    BN(op(x; W, b)) = op(x; W', b')."""
    W, b = merged(u, p, mods), p[f"b{u}"]
    if not unit.bn:
        return W, b
    scale = p[f"gamma{u}"] / np.sqrt(p[f"var{u}"] + layers.BN_EPS)  # (M,)
    return W * scale, (b - p[f"mean{u}"]) * scale + p[f"beta{u}"]  # per output column


def unit_infer(unit: Unit, h, W, b):
    """The frozen unit on h, given its folded (W', b'): the op, ReLU in place, pooling.

    The same function as unit_forward in inference mode with one pass over the feature map
    less for BN and none for ReLU's mask: the frozen forward of every Skip-Cache fill.
    """
    if unit.op == "dw":
        y, _ = cl.depthwise_forward(h, W, b, KERNEL)  # (B, H, W, C)
    else:
        y = to_rows(unit, h) @ W  # (n, M) = (n, N) @ (N, M)
        y += b
        y = y.reshape((*h.shape[:-1], unit.c_out) if unit.op != "fc" else (len(h), unit.c_out))
    if unit.bn:
        np.maximum(y, 0, out=y)  # ReLU
    if unit.pool == "max":
        y, _ = cl.maxpool_forward(y)  # (B, H/2, W/2, M)
    return y


# ----------------------------------------------------------------------------- backward
def unit_backward(unit: Unit, u: int, g, caches, mods: UnitMods = FROZEN, *, need_dx,
                  need_W=False, need_b=False) -> tuple:  # fmt: skip
    """(dx or None, {parameter name: gradient}) for the parameters the flags ask for."""
    grads = {}
    if unit.pool == "max":
        g = cl.maxpool_backward(g, caches["pool"])
    if unit.bn:
        g = layers.relu_backward(g, caches["relu"])
        if mods.bn_train:
            g, grads[f"gamma{u}"], grads[f"beta{u}"] = cl.bn2d_train_backward(g, caches["bn"])
        else:
            g = layers.bn_infer_backward(g, caches["bn"])
    if unit.op == "dw":
        dx = _depthwise_backward(g, u, caches["op"], mods, grads, need_dx, need_W, need_b)
    else:
        dx = _rows_backward(unit, g, u, caches["op"], mods, grads, need_dx, need_W, need_b)
    return dx, grads


def _depthwise_backward(g, u, op_cache, mods, grads, need_dx, need_W, need_b):
    dw_cache, merge = op_cache
    adapted = mods.lora is not None or mods.dora is not None
    dx, dW, db = cl.depthwise_backward(
        g, dw_cache, need_dx=need_dx, need_dW=need_W or adapted, need_db=need_b
    )
    if mods.lora is not None:
        grads[f"A{u}"], grads[f"B{u}"] = peft.lora_merge_backward(dW, merge)
    elif mods.dora is not None:
        grads[f"A{u}"], grads[f"B{u}"], grads[f"m{u}"] = peft.dora_merge_backward(dW, merge)
    elif need_W:
        grads[f"W{u}"] = dW
    if need_b:
        grads[f"b{u}"] = db
    return dx


def _rows_backward(unit, g, u, op_cache, mods, grads, need_dx, need_W, need_b):
    fc_cache, lora_cache, h_shape = op_cache
    g_rows = g.reshape(-1, unit.c_out)  # (n, M)
    if mods.dora is not None:
        drows, grads[f"A{u}"], grads[f"B{u}"], grads[f"m{u}"] = peft.dora_backward(
            g_rows, fc_cache, need_dx=need_dx
        )
    else:
        drows, dW, db = layers.fc_backward(
            g_rows, fc_cache, need_dx=need_dx, need_dW=need_W, need_db=need_b
        )
        if need_W:
            grads[f"W{u}"] = dW
        if need_b:
            grads[f"b{u}"] = db
        if mods.lora is not None:
            dl, grads[f"A{u}"], grads[f"B{u}"] = layers.lora_backward(
                g_rows, lora_cache, need_dx=need_dx
            )
            if need_dx:
                drows += dl
    return from_rows(unit, drows, h_shape) if need_dx else None
