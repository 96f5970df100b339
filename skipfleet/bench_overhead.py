"""What a training step costs without its arithmetic: the same code on a 4-wide model.

At batch 20 a desktop CPU does this trainer's arithmetic in microseconds, so much of a step
is the fixed cost of each NumPy call and of the Python around it. The very same method run
on a model of the paper's depth but 4 inputs and 4 hidden units keeps that fixed cost and
almost none of the arithmetic; the rest of a real step's time is arithmetic.
"""

from __future__ import annotations

import numpy as np

from agent.trainer.finetune import run_method
from agent.trainer.model import BaseModel, init_params

TINY_WIDTH = 4  # even, so the 4-bit cache packs it too


def fixed_cost_per_batch(methods, *, n_samples: int, n_classes: int, epochs: int = 20,
                         repeats: int = 3, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Seconds per batch of each method on a 4-wide model (best of `repeats` runs)."""
    rng = np.random.default_rng(seed)
    params = init_params(TINY_WIDTH, n_classes, rng, hidden=TINY_WIDTH)
    params["in_mean"] = np.zeros(TINY_WIDTH, dtype=np.float32)
    params["in_std"] = np.ones(TINY_WIDTH, dtype=np.float32)
    model = BaseModel(params, {"purpose": "fixed-cost probe"})
    X = rng.standard_normal((n_samples, TINY_WIDTH)).astype(np.float32)
    y = rng.integers(0, n_classes, n_samples)
    out = {}
    for name in methods:
        runs = [
            run_method(model, X, y, method=name, epochs=epochs, seed=seed) for _ in range(repeats)
        ]
        out[name] = min(r.times.per_batch()["total"] for r in runs)
    return out
