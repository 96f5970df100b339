"""How far naive FedAvg of factors lands from the exact aggregate, per layer and in logits.

The base model's frozen head z cancels in the difference of logits, so the layer inputs x_k
(BaseModel.frozen_features(X)[0]) are all that is needed:
Δlogits = Σ_k x_k (ΔW_naive,k − ΔW_exact,k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.aggregation.arrays import AdapterShape, Arrays, effective_deltas
from coordinator.aggregation.validation import AggregationError


@dataclass(frozen=True)
class AggregationGap:
    # ‖ΔW_naive,k − ΔW_exact,k‖_F / ‖ΔW_exact,k‖_F for each layer k.
    relative_frobenius: tuple[float, ...]
    # Only when layer inputs are given: the largest |logit difference|, and ‖Δlogits‖_F relative
    # to ‖logit shift of the exact adapter‖_F.
    logit_max_abs_diff: float | None = None
    logit_relative_diff: float | None = None


def aggregation_gap(
    exact: Arrays,
    naive: Arrays,
    shape: AdapterShape,
    layer_inputs: Sequence[np.ndarray] | None = None,
) -> AggregationGap:
    exact_deltas = effective_deltas(exact, shape)
    naive_deltas = effective_deltas(naive, shape)
    errors = tuple(_relative(n - e, e) for e, n in zip(exact_deltas, naive_deltas, strict=True))
    if layer_inputs is None:
        return AggregationGap(errors)
    _check_inputs(layer_inputs, shape)
    exact_shift = sum(x @ e for x, e in zip(layer_inputs, exact_deltas, strict=True))
    difference = sum(
        x @ (n - e) for x, e, n in zip(layer_inputs, exact_deltas, naive_deltas, strict=True)
    )
    return AggregationGap(
        errors, float(np.abs(difference).max()), _relative(difference, exact_shift)
    )


def _relative(difference: np.ndarray, reference: np.ndarray) -> float:
    diff_norm = float(np.linalg.norm(difference))
    ref_norm = float(np.linalg.norm(reference))
    if ref_norm == 0.0:
        return 0.0 if diff_norm == 0.0 else float("inf")
    return diff_norm / ref_norm


def _check_inputs(layer_inputs: Sequence[np.ndarray], shape: AdapterShape) -> None:
    if len(layer_inputs) != len(shape.layer_dims):
        raise AggregationError(
            f"expected {len(shape.layer_dims)} layer inputs, got {len(layer_inputs)}"
        )
    for k, x in zip(shape.layers, layer_inputs, strict=True):
        if x.ndim != 2 or x.shape[1] != shape.input_dim(k):
            raise AggregationError(
                f"layer {k} input has shape {x.shape}, expected (n, {shape.input_dim(k)})"
            )
    if len({x.shape[0] for x in layer_inputs}) != 1:
        raise AggregationError("layer inputs must have the same number of rows (samples)")
