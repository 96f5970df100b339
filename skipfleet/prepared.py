"""A prepared fleet on disk (what `skipfleet prepare` writes, `simulate --fleet-dir` reads):

    DIR/base.npz            the base model
    DIR/shards/shard-K.npz  one device data file per device, K = 0..N-1 (agent/device_data.py)
    DIR/manifest.json       the task, the base model's hash, and per shard: the device id a
                            simulation gives it (`simulated_device`), what it is, if it drifts

The compose fleet mounts DIR at /data/fleet (deploy/README.md); on a Pi, copy base.npz and one
shard and pass them as --base-model and --data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agent.data.errors import DataError
from skipfleet.scenario import DeviceSpec, Scenario

BASE_MODEL = "base.npz"
MANIFEST = "manifest.json"


def shard_path(fleet_dir: Path, k: int) -> Path:
    return fleet_dir / "shards" / f"shard-{k}.npz"


def shard_entry(k: int, device_id: str, what: str, drifts: bool) -> dict:
    return {"shard": k, "simulated_device": device_id, "what": what, "drifts": drifts}


def write_manifest(fleet_dir: Path, manifest: dict) -> None:
    (fleet_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_prepared_fleet(fleet_dir: Path) -> Scenario:
    """The fleet in `fleet_dir` as a simulation's scenario; DataError if anything is missing or
    does not belong together."""
    manifest = _read_manifest(fleet_dir)
    base_model = fleet_dir / BASE_MODEL
    stored_hash = _weights_hash(base_model)
    if stored_hash != manifest["base_model_hash"]:
        raise DataError(
            f"{base_model}: weights hash {stored_hash[:12]}... is not the "
            f"manifest's {manifest['base_model_hash'][:12]}...: base.npz was "
            "replaced after prepare; run prepare again"
        )
    devices = []
    for entry in manifest["shards"]:
        path = shard_path(fleet_dir, int(entry["shard"]))
        if not path.is_file():
            raise DataError(f"{path}: listed in {fleet_dir / MANIFEST} but missing")
        devices.append(
            DeviceSpec(entry["simulated_device"], path, entry["what"], bool(entry["drifts"]))
        )
    if not devices:
        raise DataError(f"{fleet_dir / MANIFEST}: lists no shards")
    dataset = manifest["dataset"]
    return Scenario(
        dataset,
        dataset,
        base_model,
        stored_hash,
        tuple(devices),
        manifest.get("description", f"the fleet prepared in {fleet_dir}"),
    )


def _read_manifest(fleet_dir: Path) -> dict:
    path = fleet_dir / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: not found (is {fleet_dir} the --out of skipfleet prepare?)")
    try:
        manifest = json.loads(path.read_text())
        missing = [k for k in ("dataset", "base_model_hash", "shards") if k not in manifest]
    except (OSError, ValueError, TypeError) as error:
        raise DataError(f"{path}: not a prepared fleet's manifest ({error})") from error
    if missing:
        raise DataError(f"{path}: not a prepared fleet's manifest (no {', '.join(missing)})")
    return manifest


def _weights_hash(base_model: Path) -> str:
    """The hash the model file's header records (the agent checks it against the weights)."""
    if not base_model.is_file():
        raise DataError(f"{base_model}: not found")
    try:
        with np.load(base_model, allow_pickle=False) as npz:
            return str(json.loads(str(npz["header"]))["weights_hash"])
    except Exception as error:  # zip, JSON, missing header: one clear message
        raise DataError(f"{base_model}: not a skipfleet base model ({error})") from error
