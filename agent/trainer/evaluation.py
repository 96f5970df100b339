"""How a device judges an adapter on its own hold-out, and when one is better than another.

A device switches what it runs only for a candidate that *measures better* on its hold-out:
higher accuracy, or the same accuracy and a lower mean cross-entropy. The tie-break matters on
small hold-outs (a device with 10 labels holds out 3): accuracy alone ties most of the time, and
a tie would keep a poor adapter that happens to get the same few rows right.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measure:
    accuracy: float  # fraction of hold-out rows classified right
    loss: float  # mean cross-entropy over the hold-out rows (nats)
    rows: int

    def better_than(self, other: Measure) -> bool:
        """Strictly better: more accurate, or as accurate with a lower loss."""
        if self.accuracy != other.accuracy:
            return self.accuracy > other.accuracy
        return self.loss < other.loss


def measure(model, X: np.ndarray, y: np.ndarray, adapter=None) -> Measure:
    """Accuracy and mean cross-entropy of the model (with the adapter) on (X, y)."""
    if len(y) == 0:
        raise ValueError("no rows to measure on")
    logits = model.logits(X, adapter).astype(np.float64)  # (n, C)
    shifted = logits - logits.max(axis=1, keepdims=True)  # (n, C) stable log-softmax
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))  # (n, C)
    rows = np.arange(len(y))
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return Measure(accuracy, float(-log_p[rows, y].mean()), len(y))
