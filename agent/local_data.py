"""The device's local data as the agent uses it, and the one-way switch to its drifted data.

A simulated device may carry a second set of rows (`X_drift`, `y_drift` if labelled): what it
sees after a drift event, e.g. its fan moved from a quiet room to a noisy one. Before the
switch the agent trains on, holds out and streams its normal rows; after it, the drifted rows.
A job takes `current()` once when it starts, so a switch during a job takes effect at the next
job.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from agent.data.errors import DataError
from agent.device_data import load_drifted_data
from agent.errors import DataUnusable
from agent.learner import Learner, load_split, split_rows
from agent.trainer.model import BaseModel


@dataclass(frozen=True)
class DataPhase:
    learner: Learner  # the train / hold-out split of this phase's rows
    stream: np.ndarray  # all of the phase's rows in time order: what the sensor replays
    drifted: bool


class SwitchResult(Enum):
    SWITCHED = "switched"
    ALREADY_DRIFTED = "already_drifted"
    UNAVAILABLE = "unavailable"  # the device data has no drifted rows


class LocalData:
    def __init__(self, normal: DataPhase, drifted: DataPhase | None = None):
        self._normal = normal
        self._drifted = drifted
        self._current = normal
        self._lock = threading.Lock()

    @property
    def model(self) -> BaseModel:
        return self._normal.learner.model

    @property
    def can_drift(self) -> bool:
        return self._drifted is not None

    def current(self) -> DataPhase:
        with self._lock:
            return self._current

    def switch_to_drift(self) -> SwitchResult:
        with self._lock:
            if self._drifted is None:
                return SwitchResult.UNAVAILABLE
            if self._current is self._drifted:
                return SwitchResult.ALREADY_DRIFTED
            self._current = self._drifted
            return SwitchResult.SWITCHED


def load_local_data(
    data_path: Path, model: BaseModel, holdout_fraction: float, seed: int
) -> LocalData:
    """Both phases of the device data; DataUnusable if either cannot feed this model."""
    rows, train, holdout = load_split(data_path, model, holdout_fraction, seed)
    normal = DataPhase(Learner(model, train, holdout), rows.X, drifted=False)
    try:
        drifted = load_drifted_data(data_path, model.n_classes, model.n_inputs)
    except DataError as err:
        raise DataUnusable(f"device data unusable: {err}") from None
    if drifted is None:
        return LocalData(normal)
    train, holdout = split_rows(drifted, model, holdout_fraction, seed)
    return LocalData(normal, DataPhase(Learner(model, train, holdout), drifted.X, drifted=True))
