"""Small builders shared by the coordinator tests (plain functions: no Ray, no MQTT)."""

from __future__ import annotations

import numpy as np

from coordinator.aggregation import AdapterShape

# Small stand-in for (n_inputs, 96, 96) × C: same structure, faster.
SHAPE = AdapterShape(layer_dims=(12, 8, 8), n_classes=3)


def random_factors(rng: np.random.Generator, rank: int = 4, shape: AdapterShape = SHAPE) -> dict:
    arrays = {}
    for k in shape.layers:
        arrays[f"A{k}"] = rng.normal(size=(shape.input_dim(k), rank)).astype(np.float32)
        arrays[f"B{k}"] = rng.normal(size=(rank, shape.n_classes)).astype(np.float32)
    return arrays


def random_deltas(rng: np.random.Generator, shape: AdapterShape = SHAPE) -> dict:
    return {
        f"delta{k}": rng.normal(size=shape.delta_shape(k)).astype(np.float32) for k in shape.layers
    }
