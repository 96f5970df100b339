"""The cooling-fan fleet (`fan_fleet.npz`): one group of recordings per simulated device.

A group is one (fan size, room, fan condition); its hmlo recordings step the fan through the
speeds h, m, l and o (stopped). Labels are the 3 classes of the Damage tasks, so one model serves
both: 0 stop (speed o), 1 normal fan running, 2 damaged fan (damage1 or damage2) running.

Groups (id, name):  0 8cm_silentA_normal    1 12cm_silentA_normal   2 12cm_silentB_normal
                    3 12cm_noisy_normal     4 14cm_silentA_normal   5 12cm_silentA_damage1
                    6 12cm_silentB_damage1  7 12cm_noisy_damage1    8 12cm_silentA_damage2
                    9 12cm_silentB_damage2 10 12cm_noisy_damage2

Devices and drift (`fan_fleet_devices`): a device is a fan in a quiet room (silentA or silentB),
8 devices in all. Its drift is the room becoming the noisy one: the same fan (size, condition)
then produces the noisy group's spectra. Only the 12 cm fans were recorded in the noisy room:

    device (quiet group)          -> after drift (noisy group)
    1 12cm_silentA_normal         -> 3 12cm_noisy_normal
    2 12cm_silentB_normal         -> 3 12cm_noisy_normal
    5 12cm_silentA_damage1        -> 7 12cm_noisy_damage1
    6 12cm_silentB_damage1        -> 7 12cm_noisy_damage1
    8 12cm_silentA_damage2        -> 10 12cm_noisy_damage2
    9 12cm_silentB_damage2        -> 10 12cm_noisy_damage2
    0 8cm_silentA_normal          -> none (never drifts)
    4 14cm_silentA_normal         -> none (never drifts)

A group alone holds only two of the three classes (stop and its own fan condition running).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset, check_labels
from agent.data.errors import DataError
from agent.data.fan import (
    FAN_CLASS_NAMES,
    FAN_N_FEATURES,
    FAN_SPEED_NAMES,
    FAN_SPEED_STOPPED,
    check_spectra,
    fan_features,
)
from agent.data.locate import data_file
from agent.data.npz import (
    KIND_BOOL,
    KIND_FLOAT,
    KIND_INT,
    KIND_STR,
    read_npz,
    require_array,
    require_same_length,
)

FAN_FLEET_FILE = "fan_fleet.npz"
# The group table of fan_fleet.npz; the device mapping below is written against it, and the
# loaders refuse a file whose table differs, so the two cannot drift apart silently.
FAN_FLEET_GROUP_NAMES = (
    "8cm_silentA_normal", "12cm_silentA_normal", "12cm_silentB_normal", "12cm_noisy_normal",
    "14cm_silentA_normal", "12cm_silentA_damage1", "12cm_silentB_damage1", "12cm_noisy_damage1",
    "12cm_silentA_damage2", "12cm_silentB_damage2", "12cm_noisy_damage2",
)  # fmt: skip
NOISY_ROOM = "noisy"
GROUP_TABLE = ("group_names", "group_size_cm", "group_env", "group_fan_type", "group_rpm_nominal")


@dataclass(frozen=True)
class FanGroup:
    """One group of fan_fleet.npz: a fan size in a room, normal or damaged."""

    id: int
    name: str  # e.g. "12cm_noisy_damage1"
    size_cm: int  # 8, 12, 14
    room: str  # silentA, silentB, noisy
    fan_type: str  # normal, damage1, damage2
    rpm_nominal: tuple[int, int, int, int]  # h, m, l, o


@dataclass(frozen=True)
class FanDevice:
    """A simulated fan device: a quiet-room group, and the noisy group it drifts to (if any)."""

    device_id: str  # a valid topic level, e.g. "fan-12cm-silenta-damage1"
    quiet_group: int
    quiet_group_name: str
    noisy_group: int | None  # None: this fan was never recorded in the noisy room
    noisy_group_name: str | None


def fan_fleet_devices() -> tuple[FanDevice, ...]:
    """The 8 fan devices of the fleet simulation, in group order (mapping in the module doc)."""
    index = {name: group for group, name in enumerate(FAN_FLEET_GROUP_NAMES)}
    devices = []
    for group, name in enumerate(FAN_FLEET_GROUP_NAMES):
        size, room, fan_type = name.split("_")
        if room == NOISY_ROOM:
            continue
        noisy_name = f"{size}_{NOISY_ROOM}_{fan_type}"
        noisy_group = index.get(noisy_name)
        devices.append(
            FanDevice(
                device_id=f"fan-{name.lower().replace('_', '-')}",
                quiet_group=group,
                quiet_group_name=name,
                noisy_group=noisy_group,
                noisy_group_name=noisy_name if noisy_group is not None else None,
            )
        )
    return tuple(devices)


def fan_fleet_groups(data_dir: str | os.PathLike[str]) -> tuple[FanGroup, ...]:
    """The group table of fan_fleet.npz (ids 0..10, see the module doc)."""
    path = data_file(data_dir, FAN_FLEET_FILE)
    return _read_group_table(path, read_npz(path, GROUP_TABLE))


def load_fan_fleet_group(
    data_dir: str | os.PathLike[str],
    group: int | str,
    *,
    include_constant_speed: bool = False,
) -> Dataset:
    """A Dataset of fan_features for one fleet group (by id 0..10 or by name), 3-class labels.

    The 470 hmlo spectra of its two recordings, in time order; with include_constant_speed
    also the 1200 constant-speed spectra that normal-fan groups 0-4 carry (meta
    'constant_speed' marks them; they have recording -1 and no transition).
    """
    path = data_file(data_dir, FAN_FLEET_FILE)
    names = ["X", "speed", "group", "recording", "tindex", "transition", "timestamp"]
    if include_constant_speed:
        names += ["X_const", "speed_const", "group_const", "tindex_const", "timestamp_const"]
    arrays = read_npz(path, [*GROUP_TABLE, *names])
    groups = _read_group_table(path, arrays)
    chosen = groups[_group_id(group)]
    hmlo = _hmlo_rows(path, arrays, chosen)
    parts = [hmlo, _constant_speed_rows(path, arrays, chosen)] if include_constant_speed else [hmlo]
    rows = {key: np.concatenate([part[key] for part in parts]) for key in hmlo}
    source = f"{path} [group {chosen.id} {chosen.name}]"
    check_spectra(rows["spectra"], "X", source=source)
    check_labels(rows["speed"], len(FAN_SPEED_NAMES), source=source, name="speed")
    is_damaged = chosen.fan_type != "normal"
    y = np.where(rows["speed"] == FAN_SPEED_STOPPED, 0, 2 if is_damaged else 1)  # (n,)
    meta = {
        "source": source,
        "group": chosen.id,
        "group_name": chosen.name,
        "size_cm": chosen.size_cm,
        "room": chosen.room,
        "fan_type": chosen.fan_type,
        "class_names": FAN_CLASS_NAMES,
        **{key: value for key, value in rows.items() if key != "spectra"},
    }
    return Dataset(fan_features(rows["spectra"]), y.astype(np.int64), len(FAN_CLASS_NAMES), meta)


def _group_id(group: int | str) -> int:
    if isinstance(group, str):
        if group not in FAN_FLEET_GROUP_NAMES:
            raise DataError(
                f"unknown fan fleet group {group!r}; groups: {', '.join(FAN_FLEET_GROUP_NAMES)}"
            )
        return FAN_FLEET_GROUP_NAMES.index(group)
    if isinstance(group, bool) or not isinstance(group, int | np.integer):
        raise DataError(f"fan fleet group must be an id 0..10 or a group name, got {group!r}")
    if not 0 <= group < len(FAN_FLEET_GROUP_NAMES):
        raise DataError(
            f"fan fleet group {group!r} out of range 0..{len(FAN_FLEET_GROUP_NAMES) - 1}"
        )
    return int(group)


def _read_group_table(path: Path, arrays: dict[str, np.ndarray]) -> tuple[FanGroup, ...]:
    n_groups = len(FAN_FLEET_GROUP_NAMES)
    names = require_array(arrays, "group_names", kind=KIND_STR, shape=(n_groups,), path=path)
    if tuple(names.tolist()) != FAN_FLEET_GROUP_NAMES:
        raise DataError(
            f"{path}: group_names are {names.tolist()}, expected {list(FAN_FLEET_GROUP_NAMES)} "
            "(the device mapping in agent/data/fan_fleet.py is written for that table)"
        )
    size = require_array(arrays, "group_size_cm", kind=KIND_INT, shape=(n_groups,), path=path)
    room = require_array(arrays, "group_env", kind=KIND_STR, shape=(n_groups,), path=path)
    fan_type = require_array(arrays, "group_fan_type", kind=KIND_STR, shape=(n_groups,), path=path)
    rpm = require_array(arrays, "group_rpm_nominal", kind=KIND_INT, shape=(n_groups, 4), path=path)
    return tuple(
        FanGroup(
            id=i,
            name=str(names[i]),
            size_cm=int(size[i]),
            room=str(room[i]),
            fan_type=str(fan_type[i]),
            rpm_nominal=tuple(int(r) for r in rpm[i]),
        )
        for i in range(n_groups)
    )


def _hmlo_rows(path: Path, arrays: dict[str, np.ndarray], chosen: FanGroup) -> dict:
    spectra = require_array(arrays, "X", kind=KIND_FLOAT, shape=(None, FAN_N_FEATURES), path=path)
    columns = {
        key: require_array(arrays, key, kind=kind, shape=(None,), path=path)
        for key, kind in (("speed", KIND_INT), ("group", KIND_INT), ("recording", KIND_INT),
                          ("tindex", KIND_INT), ("transition", KIND_BOOL), ("timestamp", KIND_STR))
    }  # fmt: skip
    require_same_length(path, X=spectra, **columns)
    rows = columns["group"] == chosen.id  # (n_all,)
    if not rows.any():
        raise DataError(f"{path}: no hmlo spectra for group {chosen.id} ({chosen.name})")
    return {
        "spectra": spectra[rows],
        "speed": columns["speed"][rows].astype(np.int64),
        "recording": columns["recording"][rows].astype(np.int64),
        "tindex": columns["tindex"][rows].astype(np.int64),
        "transition": columns["transition"][rows],
        "timestamp": columns["timestamp"][rows],
        "constant_speed": np.zeros(int(rows.sum()), dtype=bool),
    }


def _constant_speed_rows(path: Path, arrays: dict[str, np.ndarray], chosen: FanGroup) -> dict:
    spectra = require_array(
        arrays, "X_const", kind=KIND_FLOAT, shape=(None, FAN_N_FEATURES), path=path
    )
    speed = require_array(arrays, "speed_const", kind=KIND_INT, shape=(None,), path=path)
    group = require_array(arrays, "group_const", kind=KIND_INT, shape=(None,), path=path)
    tindex = require_array(arrays, "tindex_const", kind=KIND_INT, shape=(None,), path=path)
    timestamp = require_array(arrays, "timestamp_const", kind=KIND_STR, shape=(None,), path=path)
    require_same_length(
        path, X_const=spectra, speed_const=speed, group_const=group, tindex_const=tindex,
        timestamp_const=timestamp,
    )  # fmt: skip
    rows = group == chosen.id  # (n_const,); groups 5-10 (damaged fans) have none
    n = int(rows.sum())
    return {
        "spectra": spectra[rows],
        "speed": speed[rows].astype(np.int64),
        "recording": np.full(n, -1, dtype=np.int64),
        "tindex": tindex[rows].astype(np.int64),
        "transition": np.zeros(n, dtype=bool),
        "timestamp": timestamp[rows],
        "constant_speed": np.ones(n, dtype=bool),
    }
