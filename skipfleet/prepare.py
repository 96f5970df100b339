"""`skipfleet prepare`: a fleet's base model and device data, laid out for compose or for Pis.

    OUT/base.npz                 the pre-trained base model (its weights hash in manifest.json)
    OUT/shards/shard-K.npz       device data files, K = 0..N-1 (agent/device_data.py format)
    OUT/manifest.json            what each shard is (subject, fan group, drift)

The compose fleet mounts OUT at /data/fleet (deploy/README.md); on a Pi, copy base.npz and
one shard and pass them as --base-model and --data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("har", "fan", "fmnist"), required=True)
    parser.add_argument("--devices", type=int, required=True, help="number of shards")
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--data-dir", help="folder of the data sets (default: $SKIPFLEET_DATA_DIR)")
    parser.add_argument("--drift", action="store_true",
                        help="give devices a drifted stream (X_drift) for --drift-at")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)


def prepare(dataset: str, devices: int, data_dir: Path, out: Path, *, drift: bool, seed: int,
            log=print) -> dict:  # fmt: skip
    from skipfleet.scenario import build_scenario

    (out / "shards").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skipfleet-prepare-") as tmp:
        scenario = build_scenario(dataset, devices, data_dir, Path(tmp), drift=drift, seed=seed,
                                  log=log)  # fmt: skip
        shutil.copyfile(scenario.base_model, out / "base.npz")
        shards = []
        for k, device in enumerate(scenario.devices):
            shutil.copyfile(device.data_file, out / "shards" / f"shard-{k}.npz")
            shards.append({"shard": k, "simulated_device": device.device_id,
                           "what": device.description, "drifts": device.drifts})  # fmt: skip
    manifest = {"dataset": dataset, "base_model_hash": scenario.base_model_hash,
                "description": scenario.description, "shards": shards}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(args) -> int:
    from agent.data import DataError, resolve_data_dir

    if args.devices < 1:
        print("skipfleet prepare: --devices must be >= 1", file=sys.stderr)
        return 2
    try:
        data_dir = resolve_data_dir(args.data_dir, os.environ)
        manifest = prepare(args.dataset, args.devices, data_dir, Path(args.out), drift=args.drift,
                           seed=args.seed, log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except DataError as error:
        print(f"skipfleet prepare: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: base.npz ({manifest['base_model_hash'][:12]}), "
          f"{len(manifest['shards'])} shards")  # fmt: skip
    return 0
