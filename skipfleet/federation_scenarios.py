"""The federation benchmark's fleets: real data sets cut into devices, per seed.

Every scenario pre-trains its own base model with the seed (so the spread over seeds includes
pre-training), and returns devices. A labelled device holds train rows and a stratified hold-out
(the agent's 25 %, `holdout_split`) to judge adapters; a device without labels holds only its
inputs. `test` rows are what the benchmark scores each device on; no device ever sees them.

- new-device (fan): the base model knows the quiet rooms (their first recordings). Labelled:
  every quiet fan (its second recording) and the noisy-room fans (normal, damage1, damage2:
  first recording, two devices each). New, without labels: the same three noisy-room fans'
  second recordings. Scored: the new devices.
- label-scarce (damage1): 40 devices with 10 labelled noisy-room spectra each (the fine-tune
  split) and 64 unlabelled ones for their signature; scored on the test split.
- unseen-subjects (har): the base model knows 20 subjects; the paper's 5 drift subjects are
  labelled devices; 5 further subjects (2, 4, 6, 11, 13) are devices without labels. Scored:
  the unseen subjects.
- mixed-fleet (fan): every fan-fleet group is a labelled device (the quiet fans' second
  recording, the noisy fans' first): groups see different classes (a normal fan never a
  damaged one). Each device's rows: 25 % test, then the agent's split of the rest. Scored:
  every device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data import load_fan_fleet_group, load_fan_task, load_har_windows
from agent.data.dataset import Dataset, holdout_split
from agent.data.fan_fleet import FAN_FLEET_GROUP_NAMES
from agent.data.har_features import window_features
from agent.trainer.model import BaseModel
from skipfleet.base_model import pretrain_calibrated, stream_ids

HOLDOUT_FRACTION = 0.25  # the agent's default
LR = 0.02  # the coordinator's default step size (coordinator.config.FinetuneSettings)
SIGNATURE_ROWS = 256  # the agent's drift window
PRETRAIN_EPOCHS = 40
HAR_FLEET_SUBJECTS = (9, 14, 16, 19, 25)
HAR_UNSEEN_SUBJECTS = (2, 4, 6, 11, 13)


@dataclass(frozen=True)
class SimDevice:
    device_id: str
    group: str  # what it is, in words (fan group, subject)
    inputs: np.ndarray  # (m, d) what it sees: its signature window is the last rows
    test: Dataset  # what it is scored on
    train: Dataset | None = None  # None: a device without labels
    holdout: Dataset | None = None
    scored: bool = True

    @property
    def labelled(self) -> bool:
        return self.train is not None


@dataclass(frozen=True)
class Fleet:
    scenario: str
    dataset: str
    model: BaseModel  # pre-trained with this seed, with its drift calibration
    devices: tuple[SimDevice, ...]
    lr: float


def _labelled(device_id, group, data: Dataset, test: Dataset, seed, scored=True) -> SimDevice:
    train, holdout = holdout_split(data, HOLDOUT_FRACTION, seed=seed)
    return SimDevice(device_id, group, data.X, test, train, holdout, scored)


def _pretrain(X, y, n_classes, streams, seed, info) -> BaseModel:
    """A base model with its drift calibration, as every place that makes one does."""
    return pretrain_calibrated(X, y, n_classes, streams, epochs=PRETRAIN_EPOCHS, seed=seed,
                               info=info)  # fmt: skip


# ------------------------------------------------------------------------------------- fan
def _fan_groups(data_dir: Path) -> dict[int, Dataset]:
    return {g: load_fan_fleet_group(data_dir, g) for g in range(len(FAN_FLEET_GROUP_NAMES))}


def _fan_base(groups, seed) -> BaseModel:
    quiet = [g for g, ds in groups.items() if ds.meta["room"] != "noisy"]
    pre = [groups[g].subset(groups[g].meta["recording"] == 0) for g in quiet]
    X, y = np.concatenate([d.X for d in pre]), np.concatenate([d.y for d in pre])
    streams = np.concatenate([np.full(len(d), g) for g, d in zip(quiet, pre, strict=True)])
    return _pretrain(X, y, 3, streams, seed, {"task": "fan"})


def _recording(ds: Dataset, which: int) -> Dataset:
    return ds.subset(ds.meta["recording"] == which)


def _device_name(group_name: str) -> str:
    return "fan-" + group_name.lower().replace("_", "-")


def new_device(data_dir: Path, seed: int) -> Fleet:
    groups = _fan_groups(data_dir)
    model = _fan_base(groups, seed)
    devices = []
    for g, ds in groups.items():
        name = FAN_FLEET_GROUP_NAMES[g]
        if ds.meta["room"] != "noisy":
            own = _recording(ds, 1)
            devices.append(_labelled(_device_name(name), name, own, own, seed, scored=False))
            continue
        first, second = _recording(ds, 0), _recording(ds, 1)
        for shard in (0, 1):  # two labelled devices share the first noisy recording
            part = first.subset(np.arange(shard, len(first), 2))
            devices.append(_labelled(f"{_device_name(name)}-{shard}", name, part, part, seed,
                                     scored=False))  # fmt: skip
        devices.append(SimDevice(f"{_device_name(name)}-new", name, second.X, second))
    return Fleet("new-device", "fan", model, tuple(devices), lr=LR)


def mixed_fleet(data_dir: Path, seed: int) -> Fleet:
    groups = _fan_groups(data_dir)
    model = _fan_base(groups, seed)
    devices = []
    for g, ds in groups.items():
        name = FAN_FLEET_GROUP_NAMES[g]
        own = _recording(ds, 0 if ds.meta["room"] == "noisy" else 1)
        rest, test = holdout_split(own, HOLDOUT_FRACTION, seed=seed + 1000)
        devices.append(_labelled(_device_name(name), name, rest, test, seed))
    return Fleet("mixed-fleet", "fan", model, tuple(devices), lr=LR)


def label_scarce(data_dir: Path, seed: int, devices: int = 40, labels: int = 10) -> Fleet:
    task = load_fan_task(data_dir, "damage1")
    pre = task.pretrain
    model = _pretrain(pre.X, pre.y, 3, stream_ids(pre), seed, {"task": "fan"})
    rng = np.random.default_rng(seed)
    pool = task.finetune
    if devices * labels > len(pool):
        raise ValueError(f"{devices} x {labels} labels exceed the {len(pool)} fine-tune rows")
    order = rng.permutation(len(pool))
    fleet = []
    for k in range(devices):
        own = pool.subset(order[k * labels : (k + 1) * labels])
        unlabelled = pool.X[rng.choice(len(pool), 64, replace=False)]  # what else it sees
        train, holdout = holdout_split(own, HOLDOUT_FRACTION, seed=seed + k)
        inputs = np.concatenate([unlabelled, own.X])
        fleet.append(SimDevice(f"fan-{k:02d}", "damage1", inputs, task.test, train, holdout))
    return Fleet("label-scarce", "damage1", model, tuple(fleet), lr=LR)


# ------------------------------------------------------------------------------------- HAR
def unseen_subjects(data_dir: Path, seed: int) -> Fleet:
    windows = load_har_windows(data_dir)
    features = window_features(windows.windows)
    held_back = set(HAR_FLEET_SUBJECTS) | set(HAR_UNSEEN_SUBJECTS)
    known = np.flatnonzero(~np.isin(windows.subject, sorted(held_back)))
    streams = windows.subject[known] * 10 + windows.experiment[known]  # one per recording
    model = _pretrain(features[known], windows.y[known], 6, streams, seed, {"task": "har"})
    devices = []
    for subject in (*HAR_FLEET_SUBJECTS, *HAR_UNSEEN_SUBJECTS):
        rows = np.flatnonzero(windows.subject == subject)
        data = Dataset(features[rows], windows.y[rows], 6, {"source": f"subject {subject}"})
        device_id = f"har-s{subject:02d}"
        if subject in HAR_FLEET_SUBJECTS:
            devices.append(_labelled(device_id, f"subject {subject}", data, data, seed,
                                     scored=False))  # fmt: skip
        else:
            devices.append(SimDevice(device_id, f"subject {subject}", data.X, data))
    return Fleet("unseen-subjects", "har", model, tuple(devices), lr=LR)


SCENARIOS: dict[str, tuple[str, Callable[[Path, int], Fleet]]] = {
    "new-device": ("fan", new_device),
    "label-scarce": ("damage1", label_scarce),
    "unseen-subjects": ("har", unseen_subjects),
    "mixed-fleet": ("fan", mixed_fleet),
}
