"""Fixtures of the agent tests: a small fan base model and a drifted device's data file.

The base model is pre-trained on Damage1's silent-room split; the device holds Damage1's
noisy-room fine-tune split, on which the base model is only ~60 % accurate: the drift the
agent exists to fix. `drift_files` is a simulated device that sees the silent room first and
the noisy room after its drift switch (X_drift, y_drift). Import the fixtures by name into a
test module to use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.data.dataset import Dataset
from agent.data.fan import load_fan_split
from agent.device_data import write_device_file
from agent.trainer.finetune import pretrain
from agent.trainer.model import BaseModel


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
