"""Pre-training a base model that ships its drift calibration: the rule every place that makes
one (simulate's scenario, prepare, the benches) follows.

The rows offered for pre-training come with a stream id (a recording, a person): within a
stream rows are in time order. Each stream is cut into blocks of BLOCK_ROWS rows, and every
EVERY-th block (from the second on: a stream of a few blocks still gives one) is held out of
pre-training; the held-out blocks of each stream, in time order, are the in-distribution
streams the thresholds are calibrated on, the pre-training rows the reference of the feature
statistics (agent/drift_calibration.py). Blocks, not single
rows: neighbouring HAR windows share half their samples, so a held-out row between two
trained ones would be barely new to the model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from agent.data.dataset import Dataset
from agent.drift_calibration import fit_calibration
from agent.trainer.cnn.finetune import pretrain_cnn
from agent.trainer.finetune import pretrain
from agent.trainer.model import HIDDEN

BLOCK_ROWS = 16
EVERY = 5  # a fifth of each stream's blocks
CALIBRATION_PHASE = 1  # blocks 1, 6, 11, ... of each stream


def held_out_blocks(stream_ids: np.ndarray, phase: int = CALIBRATION_PHASE) -> np.ndarray:
    """Bool (n,): the rows in blocks phase, phase + EVERY, ... of their stream."""
    stream_ids = np.asarray(stream_ids)
    if not 0 <= phase < EVERY:
        raise ValueError(f"phase must be in 0..{EVERY - 1}, got {phase}")
    mask = np.zeros(len(stream_ids), dtype=bool)
    for stream in np.unique(stream_ids):
        rows = np.flatnonzero(stream_ids == stream)  # in time order
        block = np.arange(len(rows)) // BLOCK_ROWS
        mask[rows[block % EVERY == phase]] = True
    return mask


def stream_ids(dataset: Dataset) -> np.ndarray:
    """A loader's per-row stream: the fan recording, or the HAR subject."""
    for key in ("recording", "subject"):
        if isinstance(dataset.meta.get(key), np.ndarray):
            return dataset.meta[key]
    raise ValueError(f"{dataset.source}: no per-row recording or subject to hold blocks out of")


def streams_of(rows: np.ndarray, stream_ids: np.ndarray) -> list[np.ndarray]:
    """The row indices `rows` grouped by stream, each group in its original (time) order."""
    rows = np.asarray(rows)
    ids = np.asarray(stream_ids)[rows]
    return [rows[ids == stream] for stream in np.unique(ids)]


def pretrain_calibrated(X: np.ndarray, y: np.ndarray, n_classes: int, stream_ids: np.ndarray,
                        *, epochs: int, seed: int, info: dict | None = None,
                        unused: np.ndarray | None = None, hidden: int = HIDDEN,
                        architecture: str | None = None,
                        log: Callable[[str], None] = lambda _: None):  # fmt: skip
    """Pre-train on X, y but the calibration blocks (and the `unused` rows, a bool mask a bench
    keeps for itself), then calibrate on the blocks. `hidden`: the MLP's hidden layers' width;
    `architecture`: a CNN's (agent/trainer/cnn/arch.py) instead of the MLP."""
    held_out = held_out_blocks(stream_ids)
    if unused is not None:
        held_out &= ~unused
    train = ~held_out if unused is None else ~held_out & ~unused
    if architecture is None:
        model = pretrain(X[train], y[train], n_classes, epochs=epochs, seed=seed, info=info,
                         hidden=hidden)  # fmt: skip
    else:
        model = pretrain_cnn(X[train], y[train], n_classes, architecture=architecture,
                             epochs=epochs, seed=seed, info=info)  # fmt: skip
    streams = [X[rows] for rows in streams_of(np.flatnonzero(held_out), stream_ids)]
    calibration = fit_calibration(model, X[train], streams)
    log(
        f"drift calibration: {calibration.held_out_rows} held-out rows ({len(streams)} streams, "
        f"{calibration.windows} windows): thresholds confidence "
        f"{calibration.confidence_threshold:.4g}, feature {calibration.feature_threshold:.4g}"
    )
    return model.with_calibration(calibration)
