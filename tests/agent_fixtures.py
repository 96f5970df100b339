"""Fixtures of the agent tests: a small fan base model and a drifted device's data file.

The base model is pre-trained on Damage1's silent-room split (recording silentA_1) and carries a
drift calibration whose thresholds come from the other silent-room recordings (another session,
and room B); the device holds Damage1's noisy-room fine-tune split, on which the base model is
only ~60 % accurate: the drift the agent exists to fix. `drift_files` is a simulated device that
sees the silent room first and the noisy room after its drift switch (X_drift, y_drift);
`unlabelled_files` the noisy-room rows without labels. Import the fixtures by name into a test
module to use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.adapter_store import AdapterStore
from agent.choice import OwnChoice
from agent.data.dataset import Dataset, holdout_split
from agent.data.fan import load_fan_split
from agent.declined import DeclinedVersions
from agent.device_data import write_device_file
from agent.drift_calibration import fit_calibration
from agent.trainer.finetune import finetune, pretrain
from agent.trainer.model import BaseModel
from skipfleet.base_model import streams_of

PRETRAIN_RECORDINGS = ("12cm_hmlo_damage1_silentA_1", "12cm_hmlo_normal_silentA_1")


@dataclass(frozen=True)
class FanFiles:
    base_model_path: Path
    device_data_path: Path
    model: BaseModel
    device_data: Dataset


@pytest.fixture(scope="session")
def fan_files(data_dir, tmp_path_factory) -> FanFiles:
    root = tmp_path_factory.mktemp("fan")
    silent = load_fan_split(data_dir, "damage1", "pretrain")
    noisy = load_fan_split(data_dir, "damage1", "finetune")
    model = pretrain(silent.X, silent.y, silent.n_classes, epochs=20, lr=0.05, seed=0)
    quiet = load_fan_split(data_dir, "damage1", "silent_all")
    recording = quiet.meta["recording"]
    other = np.flatnonzero(~np.isin(recording, PRETRAIN_RECORDINGS))  # never pre-trained on
    held_out = [quiet.X[rows] for rows in streams_of(other, recording)]
    model = model.with_calibration(fit_calibration(model, silent.X, held_out))
    model.save(root / "base.npz")
    write_device_file(root / "device.npz", noisy)
    return FanFiles(root / "base.npz", root / "device.npz", model, noisy)


@dataclass(frozen=True)
class DriftFiles:
    """A simulated fan device that starts in a quiet room and is moved to a noisy one."""

    base_model_path: Path
    device_data_path: Path
    model: BaseModel
    quiet: Dataset  # X, y: all silent-room recordings (the pre-training room)
    noisy: Dataset  # X_drift, y_drift: the noisy-room fine-tune split


@pytest.fixture(scope="session")
def drift_files(data_dir, fan_files, tmp_path_factory) -> DriftFiles:
    root = tmp_path_factory.mktemp("fan-drift")
    quiet = load_fan_split(data_dir, "damage1", "silent_all")
    noisy = load_fan_split(data_dir, "damage1", "finetune")
    write_device_file(root / "device.npz", quiet, drifted=noisy)
    return DriftFiles(fan_files.base_model_path, root / "device.npz", fan_files.model, quiet, noisy)


@dataclass(frozen=True)
class UnlabelledFiles:
    """A device without labels: the noisy-room rows (X) alone."""

    base_model_path: Path
    device_data_path: Path
    model: BaseModel
    rows: Dataset  # what the file holds, with the labels it does not have


@pytest.fixture(scope="session")
def unlabelled_files(fan_files, tmp_path_factory) -> UnlabelledFiles:
    root = tmp_path_factory.mktemp("fan-unlabelled")
    write_device_file(root / "device.npz", fan_files.device_data, labels=False)
    return UnlabelledFiles(
        fan_files.base_model_path, root / "device.npz", fan_files.model, fan_files.device_data
    )


@pytest.fixture(scope="session")
def good_arrays(fan_files) -> dict[str, np.ndarray]:
    """A ΔW adapter trained on the fan device's own training rows (hold-out split 0.25, seed 0):
    clearly better on its hold-out than the base model."""
    train, _ = holdout_split(fan_files.device_data, 0.25, seed=0)
    result = finetune(fan_files.model, train.X, train.y, method="skip2-delta", epochs=20, seed=5)
    return result.adapter.to_arrays()


def own_choice(store: AdapterStore, root: Path) -> OwnChoice:
    """The device's only-if-better choice over `store`, its declines kept under `root`."""
    return OwnChoice(store, DeclinedVersions(root / "declined.json"))
