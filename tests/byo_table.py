"""A small task of a user's own, as `skipfleet prepare --from` takes it: a CSV of pump sensors.

Three classes (`idle`, `running`, `clogged`), each a Gaussian blob in 6 features; six pumps with
120 rows each. `Pump F`'s sensor is mounted upside down (every channel reads with the opposite
sign): a base model pre-trained on other pumps is wrong on it, and its own fine-tune fixes that.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CLASSES = ("idle", "running", "clogged")
FEATURES = ("vibration", "current", "pressure", "flow", "temperature", "noise")
PUMPS = ("Pump A", "Pump B", "Pump C", "Pump D", "pump-e", "Pump F")
ROWS = 120
UPSIDE_DOWN_PUMP = "Pump F"


def pump_rows(pump_index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(features (ROWS, 6), class indices (ROWS,)) of one pump, in time order."""
    means = np.random.default_rng(seed).normal(0.0, 2.0, (len(CLASSES), len(FEATURES)))
    rng = np.random.default_rng(seed + 1 + pump_index)
    y = rng.integers(0, len(CLASSES), ROWS)
    X = means[y] + rng.normal(0.0, 1.0, (ROWS, len(FEATURES)))
    if PUMPS[pump_index] == UPSIDE_DOWN_PUMP:
        X = -X
    return X, y


def write_pump_csv(path: Path) -> Path:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["pump", *FEATURES, "state"])
        for k, pump in enumerate(PUMPS):
            X, y = pump_rows(k)
            for row, label in zip(X, y, strict=True):
                out.writerow([pump, *(f"{v:.5f}" for v in row), CLASSES[label]])
    return path
