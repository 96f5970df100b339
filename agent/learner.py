"""The trainer as the agent uses it: the base model, the device's data split, adapter conversion.

The device keeps a stratified hold-out of its local data (never trained on) to measure accuracy
before and after each fine-tune, and trains on the rest. A device without labels has neither:
its train and hold-out sets are empty, and `labelled` says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset, holdout_split
from agent.data.errors import DataError
from agent.device_data import DeviceRows, load_device_data
from agent.errors import BaseModelUnusable, DataUnusable
from agent.trainer.adapter import Adapter
from agent.trainer.base_models import finetune
from agent.trainer.base_models import load_base_model as load_model_file
from agent.trainer.cnn.model import CnnModel
from agent.trainer.errors import ModelFileError
from agent.trainer.evaluation import Measure, measure
from agent.trainer.finetune import FinetuneResult
from agent.trainer.methods import resolve
from agent.trainer.model import BaseModel
from shared.protocol.messages import FinetuneParams

MIN_TRAIN_SAMPLES = 2


class InvalidMethod(ValueError):
    """The method does not exist, or changes the base model (a device ships adapters only)."""


def load_base_model(path: Path) -> BaseModel | CnnModel:
    """The base model file, MLP or CNN (by the kind in its header)."""
    try:
        return load_model_file(path)
    except ModelFileError as err:
        raise BaseModelUnusable(f"base model unusable: {err}") from None


def load_split(
    data_path: Path, model: BaseModel | CnnModel, holdout_fraction: float, seed: int
) -> tuple[DeviceRows, Dataset, Dataset]:
    """(rows, train, holdout) of the device data; DataUnusable if it cannot feed this model."""
    try:
        rows = load_device_data(data_path, model.n_classes)
    except DataError as err:
        raise DataUnusable(f"device data unusable: {err}") from None
    if rows.n_features != model.n_inputs:
        raise DataUnusable(
            f"device data {rows.source} has {rows.n_features} features; the base model "
            f"expects {model.n_inputs}"
        )
    return (rows, *split_rows(rows, model, holdout_fraction, seed))


def split_rows(
    rows: DeviceRows, model: BaseModel, holdout_fraction: float, seed: int
) -> tuple[Dataset, Dataset]:
    """(train, holdout) of labelled rows; two empty sets for rows without labels."""
    if rows.labelled is None:
        none = Dataset(rows.X[:0], np.zeros(0, np.int64), model.n_classes, {"source": rows.source})
        return none, none
    train, holdout = holdout_split(rows.labelled, holdout_fraction, seed=seed)
    if len(holdout) == 0 or len(train) < MIN_TRAIN_SAMPLES:
        raise DataUnusable(f"device data {rows.source}: {len(rows)} rows are too few to split")
    return train, holdout


@dataclass(frozen=True)
class Learner:
    model: BaseModel | CnnModel
    train: Dataset
    holdout: Dataset

    @property
    def labelled(self) -> bool:
        """Whether the device can fine-tune and measure accuracy (it has labelled rows)."""
        return len(self.holdout) > 0 and len(self.train) >= MIN_TRAIN_SAMPLES

    def adapter(self, arrays: Mapping[str, np.ndarray] | None) -> Adapter | None:
        """Check stored or received arrays against this model; AdapterError if they do not fit."""
        if arrays is None:
            return None
        return Adapter.from_arrays(dict(arrays), self.model.layer_input_dims, self.model.n_classes)

    def holdout_accuracy(self, adapter: Adapter | None) -> float:
        return self.holdout_measure(adapter).accuracy

    def holdout_measure(self, adapter: Adapter | None) -> Measure:
        """Accuracy and mean cross-entropy on the hold-out: what "measures better" compares."""
        if len(self.holdout) == 0:
            raise ValueError("no labelled hold-out: the device has no labels")
        return measure(self.model, self.holdout.X, self.holdout.y, adapter)

    def logits(self, X: np.ndarray, adapter: Adapter | None) -> np.ndarray:
        return self.model.logits(X, adapter)

    def finetune(
        self,
        params: FinetuneParams,
        *,
        start: Adapter | None,
        cancel: threading.Event,
        progress: Callable[[float], None],
    ) -> FinetuneResult:
        check_method(params.method)
        X, y = self.training_rows(params.max_samples)
        return finetune(
            self.model,
            X,
            y,
            method=params.method,
            epochs=params.epochs,
            lr=params.lr,
            batch_size=params.batch_size,
            rank=params.rank,
            seed=params.seed,
            start=start,
            cancel=cancel,
            progress=lambda epoch, epochs: progress(epoch / epochs),
            steps=params.steps,
        )

    def training_rows(self, max_samples: int | None) -> tuple[np.ndarray, np.ndarray]:
        """The most recent `max_samples` training rows (rows are in time order), or all."""
        n = len(self.train) if max_samples is None else min(max_samples, len(self.train))
        return self.train.X[-n:], self.train.y[-n:]


def check_method(method: str) -> None:
    try:
        spec, _ = resolve(method)
    except ValueError as err:
        raise InvalidMethod(str(err)) from None
    if not spec.is_adapter_only:
        raise InvalidMethod(f"{method} changes the base model; a device ships Skip-LoRA adapters")
