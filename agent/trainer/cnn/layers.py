"""The CNNs' layers as pure functions, in the style of the MLP's `agent/trainer/layers.py`.

Feature maps are channels-last, (B, H, W, C): a pointwise convolution is then one product of
(B·H·W, C) rows, and BN is the MLP's BN over those rows. Every convolution keeps its input's
height and width (stride 1, zero padding k//2); pooling halves them. A k×k convolution is im2col
+ one product: its kernel is stored as a matrix W of shape (k·k·C_in, C_out), so it is an FC layer
on the patches, and LoRA, DoRA and GaLore treat conv kernels and FC weights alike. A depthwise
kernel is a (k·k, C) matrix. Backward functions take `need_*` flags like the MLP's. Shapes: B
batch, H W height width, C channels, M output channels, K = k·k taps.
"""

from __future__ import annotations

import numpy as np

from agent.trainer import layers


# ------------------------------------------------------------------ padding and patches
def pad_hw(x, pad):
    """Zero padding of height and width: (B, H, W, C) -> (B, H + 2p, W + 2p, C)."""
    B, H, W, C = x.shape
    out = np.zeros((B, H + 2 * pad, W + 2 * pad, C), dtype=x.dtype)  # (B, H+2p, W+2p, C)
    out[:, pad : pad + H, pad : pad + W] = x
    return out


def im2col(x, k):
    """Every k×k patch of x (zero-padded) as a row: (B, H, W, C) -> (B·H·W, k·k·C).

    k·k copies of shifted views, one per tap: the column order (tap row, tap col, channel)
    matches the kernel matrix's rows.
    """
    B, H, W, C = x.shape
    xp = pad_hw(x, k // 2)  # (B, H+2p, W+2p, C)
    cols = np.empty((B, H, W, k, k, C), dtype=x.dtype)  # (B, H, W, k, k, C)
    for i in range(k):
        for j in range(k):
            cols[:, :, :, i, j, :] = xp[:, i : i + H, j : j + W, :]
    return cols.reshape(B * H * W, k * k * C)


def col2im(dcols, x_shape, k):
    """The adjoint of im2col: sums each patch row's entries back onto the input pixels."""
    B, H, W, C = x_shape
    pad = k // 2
    d = dcols.reshape(B, H, W, k, k, C)  # (B, H, W, k, k, C)
    dxp = np.zeros((B, H + 2 * pad, W + 2 * pad, C), dtype=dcols.dtype)  # (B, H+2p, W+2p, C)
    for i in range(k):
        for j in range(k):
            dxp[:, i : i + H, j : j + W, :] += d[:, :, :, i, j, :]
    return dxp[:, pad : pad + H, pad : pad + W, :]  # (B, H, W, C)


# --------------------------------------------- conv k×k: y = im2col(x) W + b (FC on patches)
def conv_forward(x, W, b, k):
    B, H, Wd, _ = x.shape
    cols = im2col(x, k)  # (B·H·W, K·C)
    y, fc_cache = layers.fc_forward(cols, W, b)  # (B·H·W, M)
    return y.reshape(B, H, Wd, -1), (fc_cache, x.shape, k)


def conv_backward(dy, cache, *, need_dx=True, need_dW=True, need_db=True):
    fc_cache, x_shape, k = cache
    dy_rows = dy.reshape(-1, dy.shape[-1])  # (B·H·W, M)
    dcols, dW, db = layers.fc_backward(
        dy_rows, fc_cache, need_dx=need_dx, need_dW=need_dW, need_db=need_db
    )
    dx = col2im(dcols, x_shape, k) if need_dx else None  # (B, H, W, C)
    return dx, dW, db


# ------------------------------- depthwise k×k: each channel convolved with its own kernel
def depthwise_forward(x, W, b, k):
    """W: (k·k, C), one k×k kernel per channel; y[c] = Σ_taps x_shifted[c] W[tap, c] + b[c]."""
    H, Wd = x.shape[1:3]
    xp = pad_hw(x, k // 2)  # (B, H+2p, W+2p, C)
    y = np.zeros_like(x)  # (B, H, W, C)
    tap = np.empty_like(x)  # (B, H, W, C): one buffer for every tap's product
    for t in range(k * k):
        i, j = divmod(t, k)
        np.multiply(xp[:, i : i + H, j : j + Wd, :], W[t], out=tap)  # (B, H, W, C) * (C,)
        y += tap
    y += b  # (B, H, W, C) + (C,)
    return y, (xp, W, k)


def depthwise_backward(dy, cache, *, need_dx=True, need_dW=True, need_db=True):
    xp, W, k = cache
    H, Wd, C = dy.shape[1:]
    dW = np.empty_like(W) if need_dW else None  # (K, C)
    dxp = np.zeros_like(xp) if need_dx else None  # (B, H+2p, W+2p, C)
    for t in range(k * k):
        i, j = divmod(t, k)
        if need_dW:
            shifted = xp[:, i : i + H, j : j + Wd, :].reshape(-1, C)  # (B·H·W, C)
            dW[t] = np.einsum("nc,nc->c", shifted, dy.reshape(-1, C))  # (C,)
        if need_dx:
            dxp[:, i : i + H, j : j + Wd, :] += dy * W[t]  # (B, H, W, C)
    db = dy.sum(axis=(0, 1, 2)) if need_db else None  # (C,)
    pad = k // 2
    dx = dxp[:, pad : pad + H, pad : pad + Wd, :] if need_dx else None  # (B, H, W, C)
    return dx, dW, db


# --------------------------------------------- pointwise 1×1: the MLP's FC on pixel rows
def pointwise_forward(x, W, b):
    B, H, Wd, C = x.shape
    y, cache = layers.fc_forward(x.reshape(-1, C), W, b)  # (B·H·W, M) = (B·H·W, C) @ (C, M)
    return y.reshape(B, H, Wd, -1), (cache, x.shape)


def pointwise_backward(dy, cache, *, need_dx=True, need_dW=True, need_db=True):
    fc_cache, x_shape = cache
    dx, dW, db = layers.fc_backward(
        dy.reshape(-1, dy.shape[-1]), fc_cache, need_dx=need_dx, need_dW=need_dW, need_db=need_db
    )
    return (dx.reshape(x_shape) if need_dx else None), dW, db


# ------------------------------------------------ BN over channels: the MLP's BN on pixel rows
def bn2d_train_forward(x, gamma, beta):
    y, cache = layers.bn_train_forward(x.reshape(-1, x.shape[-1]), gamma, beta)  # (B·H·W, C)
    return y.reshape(x.shape), (cache, x.shape)


def bn2d_train_backward(dy, cache, *, need_dx=True, need_params=True):
    bn_cache, x_shape = cache
    dx, dgamma, dbeta = layers.bn_train_backward(
        dy.reshape(-1, x_shape[-1]), bn_cache, need_dx=need_dx, need_params=need_params
    )
    return (dx.reshape(x_shape) if need_dx else None), dgamma, dbeta


# BN in inference mode is a per-channel affine map: the MLP's bn_infer_* broadcast over
# (B, H, W, C) as they do over (B, C), so the CNNs call them directly.


# ------------------------------------------------------- max pooling, 2×2 windows, stride 2
WINDOW = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, col) offsets of the 4 pixels of a window


def maxpool_forward(x):
    """(B, H, W, C) -> (B, H/2, W/2, C); H and W must be even."""
    taps = [x[:, a::2, b::2, :] for a, b in WINDOW]  # 4 × (B, H/2, W/2, C)
    y = np.maximum(np.maximum(taps[0], taps[1]), np.maximum(taps[2], taps[3]))
    return y, (x, y)


def maxpool_backward(dy, cache):
    """The gradient goes to the first pixel of each window that holds the maximum."""
    x, y = cache
    dx = np.zeros_like(x)  # (B, H, W, C)
    taken = np.zeros(y.shape, dtype=bool)  # (B, H/2, W/2, C)
    for a, b in WINDOW:
        winner = (x[:, a::2, b::2, :] == y) & ~taken  # (B, H/2, W/2, C)
        dx[:, a::2, b::2, :] = dy * winner
        taken |= winner
    return dx


# ------------------------------------------------------------- average pooling, f×f windows
def avgpool_forward(x, f):
    """(B, H, W, C) -> (B, H/f, W/f, C); H and W must be multiples of f."""
    B, H, W, C = x.shape
    return x.reshape(B, H // f, f, W // f, f, C).mean(axis=(2, 4)), (x.shape, f)


def avgpool_backward(dy, cache):
    (B, H, W, C), f = cache
    spread = np.broadcast_to((dy / (f * f))[:, :, None, :, None, :], (B, H // f, f, W // f, f, C))
    return spread.reshape(B, H, W, C)  # (B, H, W, C)
