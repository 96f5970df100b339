"""The trainer's layers as pure functions, named as in the paper.

Every layer has `X_forward(x, params...) -> (out, cache)` and
`X_backward(dout, cache, need...) -> grads`; nothing is stored between calls. Backward
functions take flags so each fine-tuning method computes only the gradients it needs
(a frozen layer needs no dW/db; the first layer needs no dx). Shapes: B batch, N layer
input width, M layer output width, R LoRA rank, C classes. All arrays are float32.
"""

from __future__ import annotations

import numpy as np

BN_EPS = 1e-5


# ---------------------------------------------------------------- FC: y = x W + b
def fc_forward(x, W, b):
    y = x @ W  # (B, M) = (B, N) @ (N, M)
    y += b  # (B, M) + (M,)
    return y, (x, W)


def fc_backward(dy, cache, *, need_dx=True, need_dW=True, need_db=True):
    x, W = cache
    dx = dy @ W.T if need_dx else None  # (B, N) = (B, M) @ (M, N)
    dW = x.T @ dy if need_dW else None  # (N, M) = (N, B) @ (B, M)
    db = dy.sum(axis=0) if need_db else None  # (M,)
    return dx, dW, db


# ------------------------------------------------------ LoRA: y = (x A) B, added to a layer's y
def lora_forward(x, A, B):
    u = x @ A  # (B, R) = (B, N) @ (N, R)
    y = u @ B  # (B, M) = (B, R) @ (R, M)
    return y, (x, A, B, u)


def lora_backward(dy, cache, *, need_dx=True):
    x, A, B, u = cache
    dB = u.T @ dy  # (R, M) = (R, B) @ (B, M)
    du = dy @ B.T  # (B, R) = (B, M) @ (M, R)
    dA = x.T @ du  # (N, R) = (N, B) @ (B, R)
    dx = du @ A.T if need_dx else None  # (B, N) = (B, R) @ (R, N)
    return dx, dA, dB


# ------------------------------------------------ BN, training mode (batch statistics)
def bn_train_forward(x, gamma, beta):
    mean = x.mean(axis=0)  # (M,)
    var = x.var(axis=0)  # (M,)
    inv_std = 1.0 / np.sqrt(var + BN_EPS)  # (M,)
    xhat = (x - mean) * inv_std  # (B, M)
    y = xhat * gamma + beta  # (B, M)
    return y, (xhat, gamma, inv_std, mean, var)


def bn_train_backward(dy, cache, *, need_dx=True, need_params=True):
    xhat, gamma, inv_std, _, _ = cache
    n = dy.shape[0]
    dgamma = (dy * xhat).sum(axis=0) if need_params else None  # (M,)
    dbeta = dy.sum(axis=0) if need_params else None  # (M,)
    dx = None
    if need_dx:
        dxhat = dy * gamma  # (B, M)
        # the batch mean and variance depend on every row: the usual three-term form
        dx = (inv_std / n) * (  # (B, M)
            n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0)
        )
    return dx, dgamma, dbeta


# ------------------------------- BN, inference mode (running statistics): a fixed affine map
def bn_infer_forward(x, gamma, beta, running_mean, running_var):
    scale = gamma / np.sqrt(running_var + BN_EPS)  # (M,)
    y = (x - running_mean) * scale + beta  # (B, M)
    return y, (scale,)


def bn_infer_backward(dy, cache):
    (scale,) = cache
    return dy * scale  # (B, M): gamma and beta of a frozen layer get no gradient


# ------------------------------------------------------------------------------- ReLU
def relu_forward(x):
    mask = x > 0  # (B, M) bool
    return x * mask, mask


def relu_backward(dy, mask):
    return dy * mask  # (B, M)


# ---------------------------------------------------------- softmax cross-entropy (mean)
def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, C)
    e = np.exp(shifted)  # (B, C)
    return e / e.sum(axis=1, keepdims=True)  # (B, C)


def softmax_xent_forward(logits, labels):
    probs = softmax(logits)  # (B, C)
    rows = np.arange(len(labels))
    loss = -np.log(probs[rows, labels] + 1e-12).mean()  # scalar
    return float(loss), (probs, labels)


def softmax_xent_backward(cache):
    probs, labels = cache
    dlogits = probs.copy()  # (B, C)
    dlogits[np.arange(len(labels)), labels] -= 1.0
    dlogits /= len(labels)
    return dlogits  # (B, C)
