"""The PEFT family's layers and optimizer, as pure functions on rows (B, N) like `layers.py`.

- DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024): the adapted
  weight is W' = m ⊙ V / ‖V‖_c with V = W0 + A B, ‖·‖_c the norm of each output column and m a
  trained magnitude per column (initialised to ‖W0‖_c, so W' = W0 at the start). Since a column
  scale commutes with the product, x W' = (x W0 + (x A) B) ⊙ s with s = m / ‖V‖_c: the rows form
  never builds W' nor its gradient. A depthwise kernel is not a product, so it takes the merged
  form (W' built, its gradient chained to A, B, m).
- LoRA, merged form: W' = W0 + A B, for the depthwise kernels (the rows form is
  `layers.lora_forward`).
- Bottleneck adapter (Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML
  2019): h = x + relu(x W_down + b_down) W_up + b_up on each pixel's channels (1×1 convolutions),
  W_up starting at zero so the adapted model starts as the base model.
- GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
  ICML 2024): Adam whose moments live in a rank-r projection of each weight matrix's gradient;
  the projector is the gradient's top-r singular vectors, recomputed every T steps.
Shapes: N input width, M output width (columns), R rank, K depthwise taps, b bottleneck width.
"""

from __future__ import annotations

import numpy as np

from agent.trainer import layers


# -------------------------------------------------------------------------- DoRA, rows form
def dora_init_magnitude(W0):
    return np.sqrt((W0 * W0).sum(axis=0))  # (M,) ‖W0‖_c: the adapted weight starts as W0


def dora_forward(x, W0, A, B, m, b):
    u = x @ A  # (B, R) = (B, N) @ (N, R)
    h = x @ W0  # (B, M) = (B, N) @ (N, M)
    h += u @ B  # (B, M) += (B, R) @ (R, M): x V, V = W0 + A B
    V = W0 + A @ B  # (N, M)
    norm = np.sqrt((V * V).sum(axis=0))  # (M,) ‖V‖_c
    s = m / norm  # (M,)
    y = h * s + b  # (B, M)
    return y, (x, W0, A, B, m, u, h, V, norm, s)


def dora_backward(dy, cache, *, need_dx=True):
    """(dx, dA, dB, dm); W0 and the bias are frozen."""
    x, W0, A, B, m, u, h, V, norm, s = cache
    ds = (dy * h).sum(axis=0)  # (M,)
    dm = ds / norm  # (M,)
    dV = V * (-ds * m / norm**3)  # (N, M): through ‖V‖_c, d‖V_j‖/dV_ij = V_ij / ‖V_j‖
    dh = dy * s  # (B, M)
    dB = u.T @ dh + A.T @ dV  # (R, M) = (R, B) @ (B, M) + (R, N) @ (N, M)
    du = dh @ B.T  # (B, R) = (B, M) @ (M, R)
    dA = x.T @ du + dV @ B.T  # (N, R) = (N, B) @ (B, R) + (N, M) @ (M, R)
    dx = dh @ W0.T + du @ A.T if need_dx else None  # (B, N)
    return dx, dA, dB, dm


# ------------------------------------------------------- merged forms (depthwise kernels)
def lora_merge(W0, A, B):
    return W0 + A @ B, (A, B)  # (K, C) = (K, C) + (K, R) @ (R, C)


def lora_merge_backward(dW, cache):
    A, B = cache
    return dW @ B.T, A.T @ dW  # dA (K, R), dB (R, C)


def dora_merge(W0, A, B, m):
    V = W0 + A @ B  # (K, C)
    norm = np.sqrt((V * V).sum(axis=0))  # (C,)
    s = m / norm  # (C,)
    return V * s, (A, B, m, V, norm, s)  # (K, C)


def dora_merge_backward(dW, cache):
    """dW: gradient wrt the merged kernel W' = V ⊙ s. Returns (dA, dB, dm)."""
    A, B, m, V, norm, s = cache
    GV = (dW * V).sum(axis=0)  # (C,)
    dm = GV / norm  # (C,)
    dV = dW * s - V * (m * GV / norm**3)  # (K, C)
    return dV @ B.T, A.T @ dV, dm  # (K, R), (R, C), (C,)


# ---------------------------------------------------------------- bottleneck adapter (rows)
def bottleneck_forward(x, W_down, b_down, W_up, b_up):
    a, down_cache = layers.fc_forward(x, W_down, b_down)  # (B, b) = (B, N) @ (N, b)
    r, mask = layers.relu_forward(a)  # (B, b)
    o, up_cache = layers.fc_forward(r, W_up, b_up)  # (B, N) = (B, b) @ (b, N)
    return x + o, (down_cache, mask, up_cache)  # (B, N): the residual keeps x


def bottleneck_backward(dy, cache, *, need_dx=True):
    """(dx, dW_down, db_down, dW_up, db_up)."""
    down_cache, mask, up_cache = cache
    dr, dW_up, db_up = layers.fc_backward(dy, up_cache)  # (B, b)
    da = layers.relu_backward(dr, mask)  # (B, b)
    dx_branch, dW_down, db_down = layers.fc_backward(da, down_cache, need_dx=need_dx)
    dx = dy + dx_branch if need_dx else None  # (B, N)
    return dx, dW_down, db_down, dW_up, db_up


# ------------------------------------------------------------------------- GaLore, Adam
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8


def galore_projector(G, rank):
    """(P, side): the top-`rank` singular vectors of G (N, M) on its shorter side.

    side "left": P (N, R), the projected gradient is Pᵀ G (R, M); "right": P (M, R), G P (N, R).
    """
    U, _, Vt = np.linalg.svd(G, full_matrices=False)
    if G.shape[0] <= G.shape[1]:
        return np.ascontiguousarray(U[:, :rank]), "left"  # (N, R)
    return np.ascontiguousarray(Vt[:rank].T), "right"  # (M, R)


def galore_project(G, P, side):
    return P.T @ G if side == "left" else G @ P  # (R, M) or (N, R)


def galore_project_back(N_step, P, side):
    return P @ N_step if side == "left" else N_step @ P.T  # (N, M)


def adam_direction(grad, state, t):
    """Adam's bias-corrected step direction; `state` holds the moments (m, v), updated in place."""
    m, v = state
    m *= BETA1
    m += (1 - BETA1) * grad
    v *= BETA2
    v += (1 - BETA2) * grad * grad
    m_hat = m / (1 - BETA1**t)
    v_hat = v / (1 - BETA2**t)
    return m_hat / (np.sqrt(v_hat) + ADAM_EPS)
