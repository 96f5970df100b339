"""`skipfleet prepare --from FILE`: a fleet from the user's own task (skipfleet/device_table.py).

The devices are split in two: the held-out devices are the fleet (one shard each, all their rows
in the file's order; the agent keeps its own stratified hold-out of them), and the others
pre-train the base model, each device one stream for the drift calibration
(skipfleet/base_model.py). So every fleet device is new to the base model, as a device deployed
after pre-training is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset
from agent.data.errors import DataError
from agent.device_data import write_device_file
from shared.protocol.messages import MAX_SIGNATURE_WIDTH
from skipfleet.base_model import pretrain_calibrated
from skipfleet.device_table import DeviceTable
from skipfleet.prepared import BASE_MODEL, shard_entry, shard_path, write_manifest

DATASET = "custom"  # the manifest's and the simulation's name for a task of the user's own
MIN_PRETRAIN_ROWS = 40  # pre-training runs full batches of 20 only
HOLDOUT_SHARE = 0.25  # of the devices, when neither a list nor a count is given


def holdout_devices(
    table: DeviceTable, names: list[str] | None, count: int | None, seed: int
) -> list[str]:
    """The fleet's device ids: those named (by their name in the file or their id), else
    `count` (default a quarter, rounded up) drawn with `seed`; at least one device is left to
    pre-train."""
    devices = table.devices()
    if len(devices) < 2:
        raise DataError(
            f"{table.source}: one device only; one is needed to pre-train the base "
            "model and one for the fleet"
        )
    if names:
        by_name = {**{d: d for d in devices}, **{n: d for d, n in table.device_names.items()}}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataError(
                f"{table.source}: no device {', '.join(map(repr, unknown))} "
                f"(devices: {', '.join(devices)})"
            )
        chosen = list(dict.fromkeys(by_name[n] for n in names))
    else:
        count = count if count is not None else math.ceil(HOLDOUT_SHARE * len(devices))
        if not 1 <= count < len(devices):
            raise DataError(
                f"{table.source}: --holdout-count must be 1..{len(devices) - 1} "
                f"(one device at least pre-trains), got {count}"
            )
        chosen = list(np.random.default_rng(seed).choice(devices, size=count, replace=False))
    if len(chosen) >= len(devices):
        raise DataError(
            f"{table.source}: all {len(devices)} devices held out; leave at least "
            "one to pre-train the base model"
        )
    return [d for d in devices if d in set(chosen)]  # in the file's order


def prepare_from_table(
    table: DeviceTable,
    fleet: list[str],
    out: Path,
    *,
    hidden: int,
    epochs: int,
    seed: int,
    log: Callable[[str], None],
) -> dict:
    """Pre-train on the devices not in `fleet`, write the base model, one shard per fleet
    device and the manifest; returns the manifest."""
    if not 1 <= hidden <= MAX_SIGNATURE_WIDTH:
        raise DataError(
            f"--hidden must be 1..{MAX_SIGNATURE_WIDTH} (a heartbeat's drift "
            f"signature is one value per hidden unit), got {hidden}"
        )
    in_fleet = np.isin(table.device_ids, fleet)
    pretrain_rows = np.flatnonzero(~in_fleet)
    if len(pretrain_rows) < MIN_PRETRAIN_ROWS:
        raise DataError(
            f"{table.source}: {len(pretrain_rows)} rows on the pre-training devices; "
            f"pre-training needs at least {MIN_PRETRAIN_ROWS}"
        )
    pretrain_devices = [d for d in table.devices() if d not in set(fleet)]
    streams = np.unique(table.device_ids[pretrain_rows], return_inverse=True)[1]
    unseen = sorted(set(range(len(table.class_names))) - set(table.y[pretrain_rows].tolist()))
    if unseen:
        log(
            f"note: the pre-training devices have no rows of class(es) "
            f"{', '.join(table.class_names[c] for c in unseen)}"
        )
    log(
        f"pre-training the base model (hidden width {hidden}) on {len(pretrain_rows)} rows of "
        f"{len(pretrain_devices)} devices; {len(fleet)} devices held out for the fleet"
    )
    info = {
        "task": DATASET,
        "class_names": list(table.class_names),
        "features": list(table.feature_names),
        "source": Path(table.source).name,
    }
    model = pretrain_calibrated(
        table.X[pretrain_rows],
        table.y[pretrain_rows],
        len(table.class_names),
        streams,
        epochs=epochs,
        seed=seed,
        info=info,
        hidden=hidden,
        log=log,
    )
    (out / "shards").mkdir(parents=True, exist_ok=True)
    model.save(out / BASE_MODEL)
    shards = []
    for k, device in enumerate(fleet):
        rows = np.flatnonzero(table.device_ids == device)
        dataset = Dataset(
            table.X[rows], table.y[rows], len(table.class_names), {"class_names": table.class_names}
        )
        write_device_file(shard_path(out, k), dataset)
        what = f"device {table.device_names[device]!r} of {Path(table.source).name}"
        shards.append({**shard_entry(k, device, what, False), "rows": len(rows)})
        accuracy = model.accuracy(dataset.X, dataset.y)
        log(f"  shard {k}: {device}, {len(rows)} rows, base model accuracy {accuracy:.1%}")
    manifest = {
        "dataset": DATASET,
        "source": table.source,
        "base_model_hash": model.weights_hash,
        "hidden": hidden,
        "class_names": list(table.class_names),
        "feature_columns": list(table.feature_names),
        "pretrain_devices": pretrain_devices,
        "description": f"{Path(table.source).name}: {len(pretrain_devices)} devices pre-train; "
        f"{len(fleet)} held-out devices are the fleet",
        "shards": shards,
    }
    write_manifest(out, manifest)
    return manifest
