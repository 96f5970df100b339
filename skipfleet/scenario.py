"""A simulated fleet's data: a pre-trained base model and one data file per device.

HAR: one person per device. The base model is pre-trained on the other subjects, so every
device's person is new to it (the paper's drift subjects first, then more as the fleet grows).
With a drift event, a device starts as a person the model knows and switches to its new one.

Fan: one fan-fleet group (fan size, room, fan condition) per device. The base model is
pre-trained on the quiet rooms' first recordings; devices hold their group's other data, so
the noisy-room devices are the drifted ones. With a drift event, quiet-room devices switch to
the noisy room of the same fan.

Fashion-MNIST (skipfleet/scenario_fmnist.py): camera devices, each with its own rotation of
the images, and a CNN base model.

Device files follow agent/device_data.py (`X`, `y` in time order) plus, for a drift event,
`X_drift`, `y_drift`: the stream the device sees after the switch.

New devices (`new_devices`) have no labels: their file holds only `X`, and the labels stay with
the simulation (`truth_file`), which measures them itself (a real device without labels cannot).
Fan: new fans installed in the noisy room (the noisy groups' second recordings; drifting devices
stream the first recordings, so no spectrum is in both); HAR: people no device had yet.

The base model ships its drift calibration (skipfleet/base_model.py): a fifth of each
pre-training stream (HAR: a person; fan: a group's recording), in blocks, is held out of
pre-training for the thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data import fan_fleet_devices, load_fan_fleet_group, load_har_windows
from agent.data.fan_fleet import FAN_FLEET_GROUP_NAMES
from agent.data.har import HAR_ACTIVITY_NAMES
from agent.data.har_features import window_features
from skipfleet.base_model import pretrain_calibrated
from skipfleet.scenario_fmnist import fmnist_fleet

# People new to the base model, in the order devices get them: the paper's drift subjects first.
HAR_DEVICE_SUBJECTS = (9, 14, 16, 19, 25, 2, 4, 6, 11, 13, 20, 22, 28, 30, 17)
FAN_CLASS_NAMES = ("stop", "normal", "damaged")
HAR_NEW_DEVICES = 3  # subjects held out of everything, for devices that join later
DATASETS = ("har", "fan", "fmnist")
PRETRAIN_EPOCHS = {"har": 40, "fan": 40, "fmnist": 2}  # the CNN's are over 12,000 images


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    data_file: Path
    description: str  # what this device is, in words
    drifts: bool  # whether the file carries a drifted stream
    truth_file: Path | None = None  # a device without labels: its labels, for the simulation

    @property
    def labelled(self) -> bool:
        return self.truth_file is None


@dataclass(frozen=True)
class Scenario:
    dataset: str
    cohort: str
    base_model: Path
    base_model_hash: str
    devices: tuple[DeviceSpec, ...]
    description: str
    new_devices: tuple[DeviceSpec, ...] = ()  # without labels, joining later


def build_scenario(dataset: str, n_devices: int, data_dir: Path, out_dir: Path, *, drift: bool,
                   seed: int = 0, pretrain_epochs: int | None = None, new_devices: int = 0,
                   log: Callable[[str], None] = print) -> Scenario:  # fmt: skip
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: choose har, fan or fmnist")
    if n_devices < 1:
        raise ValueError("a fleet needs at least one device")
    out_dir.mkdir(parents=True, exist_ok=True)
    builder = {"har": _har_fleet, "fan": _fan_fleet, "fmnist": fmnist_fleet}[dataset]
    pretrain_set, devices, description, newcomers = builder(n_devices, data_dir, drift)
    if new_devices > len(newcomers):
        raise ValueError(f"{dataset} has {len(newcomers)} new devices to offer, not {new_devices}")
    log(f"pre-training the base model on {len(pretrain_set[1])} samples ({description})")
    X, y, streams, info = pretrain_set
    epochs = pretrain_epochs or PRETRAIN_EPOCHS[dataset]
    model = pretrain_calibrated(X, y, len(info["class_names"]), streams, epochs=epochs,
                                seed=seed, info=info, architecture=info.get("architecture"),
                                log=log)  # fmt: skip
    base_path = out_dir / "base-model.npz"
    model.save(base_path)
    specs = []
    for device_id, arrays, what in devices:
        path = out_dir / f"{device_id}.npz"
        with open(path, "wb") as out:
            np.savez(out, class_names=np.array(info["class_names"]), **arrays)
        specs.append(DeviceSpec(device_id, path, what, "X_drift" in arrays))
    late = [_unlabelled(out_dir, info, *n) for n in newcomers[:new_devices]]
    return Scenario(dataset, dataset, base_path, model.weights_hash, tuple(specs), description,
                    tuple(late))  # fmt: skip


def _unlabelled(out_dir: Path, info: dict, device_id: str, X, y, what: str) -> DeviceSpec:
    """A device file with inputs only, and the labels in a file of the simulation's own."""
    path, truth = out_dir / f"{device_id}.npz", out_dir / f"{device_id}.truth.npz"
    with open(path, "wb") as out:
        np.savez(out, class_names=np.array(info["class_names"]), X=X)
    with open(truth, "wb") as out:
        np.savez(out, X=X, y=y)
    return DeviceSpec(device_id, path, f"{what} (no labels)", False, truth)


def _shards(rows: np.ndarray, count: int) -> list[np.ndarray]:
    """`count` interleaved shards (every count-th row): each keeps the time order and mix."""
    return [rows[k::count] for k in range(count)]


# ----------------------------------------------------------------------------------- HAR
def _har_fleet(n_devices: int, data_dir: Path, drift: bool):
    data = load_har_windows(data_dir)
    people = HAR_DEVICE_SUBJECTS[: min(n_devices, len(HAR_DEVICE_SUBJECTS))]
    # the next people in line join later, without labels: nobody pre-trains on them either
    strangers = [s for s in HAR_DEVICE_SUBJECTS if s not in people][:HAR_NEW_DEVICES]
    known = sorted(set(range(1, 31)) - set(people) - set(strangers))
    features = window_features(data.windows)  # (n, F): what each device computes itself
    pre_rows = np.flatnonzero(np.isin(data.subject, known))
    shards_per_person = math.ceil(n_devices / len(people))
    devices = []
    for i in range(n_devices):
        person, shard = people[i % len(people)], i // len(people)
        rows = _shards(np.flatnonzero(data.subject == person), shards_per_person)[shard]
        device_id = f"har-s{person:02d}" + (f"-{shard}" if shards_per_person > 1 else "")
        if drift:  # starts as a person the model knows, then a new person wears the phone
            before = np.flatnonzero(data.subject == known[i % len(known)])
            arrays = {"X": features[before], "y": data.y[before],
                      "X_drift": features[rows], "y_drift": data.y[rows]}  # fmt: skip
            what = f"subject {known[i % len(known)]} -> subject {person}"
        else:
            arrays = {"X": features[rows], "y": data.y[rows]}
            what = f"subject {person}" + (
                f" (shard {shard + 1}/{shards_per_person})" if shard else ""
            )
        devices.append((device_id, arrays, what))
    info = {"task": "har", "class_names": list(HAR_ACTIVITY_NAMES), "features": "window_features",
            "pretrain_subjects": known}  # fmt: skip
    description = (
        f"HAR: {len(known)} known subjects pre-train; devices hold new subjects {list(people)}"
    )
    pre_set = (features[pre_rows], data.y[pre_rows], data.subject[pre_rows], info)
    newcomers = []
    for person in strangers:
        rows = np.flatnonzero(data.subject == person)
        newcomers.append((f"har-s{person:02d}-new", features[rows], data.y[rows],
                          f"subject {person}"))  # fmt: skip
    return pre_set, devices, description, newcomers


# ----------------------------------------------------------------------------------- fan
def _fan_fleet(n_devices: int, data_dir: Path, drift: bool):
    groups = {g: load_fan_fleet_group(data_dir, g) for g in range(len(FAN_FLEET_GROUP_NAMES))}
    quiet = [g for g, ds in groups.items() if ds.meta["room"] != "noisy"]
    pre = [groups[g].subset(groups[g].meta["recording"] == 0) for g in quiet]
    X_pre = np.concatenate([ds.X for ds in pre])
    y_pre = np.concatenate([ds.y for ds in pre])
    streams = np.concatenate([np.full(len(ds), g) for g, ds in zip(quiet, pre, strict=True)])
    if drift:  # quiet-room devices; those recorded in the noisy room too drift into it
        slots = [(d.quiet_group, d.noisy_group) for d in fan_fleet_devices()]
    else:  # every group is a device; the noisy rooms are the drifted ones
        slots = [(g, None) for g in groups]
    per_slot = math.ceil(n_devices / len(slots))
    devices = []
    for i in range(n_devices):
        (group, noisy), shard = slots[i % len(slots)], i // len(slots)
        own = groups[group]
        own_rows = (
            np.flatnonzero(own.meta["recording"] == 1) if group in quiet else np.arange(len(own))
        )
        rows = _shards(own_rows, per_slot)[shard]
        name = FAN_FLEET_GROUP_NAMES[group]
        device_id = "fan-" + name.lower().replace("_", "-") + (f"-{shard}" if per_slot > 1 else "")
        arrays = {"X": own.X[rows], "y": own.y[rows]}
        what = name
        if drift and noisy is not None:
            loud = groups[noisy]
            first = np.flatnonzero(loud.meta["recording"] == 0)  # the second: new devices'
            loud_rows = _shards(first, per_slot)[shard]
            arrays.update(X_drift=loud.X[loud_rows], y_drift=loud.y[loud_rows])
            what = f"{name} -> {FAN_FLEET_GROUP_NAMES[noisy]}"
        devices.append((device_id, arrays, what))
    info = {"task": "fan", "class_names": list(FAN_CLASS_NAMES), "features": "fan_features"}
    description = "fan: quiet rooms' first recordings pre-train; one fan group per device"
    newcomers = []
    for g, group in groups.items():
        if group.meta["room"] == "noisy":
            second = group.subset(group.meta["recording"] == 1)
            name = FAN_FLEET_GROUP_NAMES[g]
            newcomers.append((f"fan-{name.lower().replace('_', '-')}-new", second.X, second.y,
                              f"a new {name} fan"))  # fmt: skip
    return (X_pre, y_pre, streams, info), devices, description, newcomers
