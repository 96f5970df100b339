"""The fan world of `skipfleet bench faults`: a base model and honest devices on real data.

The base model knows the quiet room (damage1's pre-training split); each honest device holds a
disjoint share of the noisy room's fine-tune split (its agent's 25 % hold-out split off), and
every device is scored on the noisy room's test split, which no device trains or judges on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset, holdout_split
from agent.data.fan import load_fan_split
from agent.device_data import write_device_file
from agent.trainer.finetune import pretrain
from agent.trainer.model import BaseModel

TASK = "damage1"
PRETRAIN_EPOCHS = 20
HOLDOUT_FRACTION = 0.25


@dataclass(frozen=True)
class Share:
    """One honest device's rows: what it trains on, judges with, and is scored on."""

    rows: Dataset  # everything it holds (train + hold-out), as its data file has it
    train: Dataset
    holdout: Dataset


@dataclass(frozen=True)
class FanWorld:
    model: BaseModel
    shares: list[Share]
    test: Dataset  # never trained or judged on: what "harmed" is measured with

    def save(self, root: Path) -> tuple[Path, list[Path]]:
        """The base model and one device data file per share (for `skipfleet agent`)."""
        root.mkdir(parents=True, exist_ok=True)
        base = root / "base.npz"
        self.model.save(base)
        files = []
        for k, share in enumerate(self.shares):
            files.append(root / f"device-{k}.npz")
            write_device_file(files[-1], share.rows)
        return base, files


def fan_world(data_dir: Path, devices: int, seed: int = 0) -> FanWorld:
    quiet = load_fan_split(data_dir, TASK, "pretrain")
    noisy = load_fan_split(data_dir, TASK, "finetune")
    model = pretrain(quiet.X, quiet.y, quiet.n_classes, epochs=PRETRAIN_EPOCHS, lr=0.05, seed=seed)
    order = np.random.default_rng(seed).permutation(len(noisy))
    shares = []
    for k, rows in enumerate(np.array_split(order, devices)):
        held = Dataset(noisy.X[rows], noisy.y[rows], noisy.n_classes, {})
        train, holdout = holdout_split(held, HOLDOUT_FRACTION, seed=seed + k)
        shares.append(Share(held, train, holdout))
    return FanWorld(model, shares, load_fan_split(data_dir, TASK, "test"))
