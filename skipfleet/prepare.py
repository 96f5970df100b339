"""`skipfleet prepare`: a fleet's base model and device data, laid out for compose or for Pis
(the layout: skipfleet/prepared.py).

`--dataset har|fan`: the simulation's scenarios (skipfleet/scenario.py). `--from FILE`: a task of
your own, a table with a label and a device column (skipfleet/prepare_from.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from agent.trainer.model import HIDDEN
from skipfleet.prepared import BASE_MODEL, shard_entry, shard_path, write_manifest

PRETRAIN_EPOCHS = 40  # with --from: as the simulation's scenarios


def configure(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--dataset", choices=("har", "fan", "fmnist"), help="one of the simulation's"
    )
    source.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE.csv|FILE.npz",
        help="your own task: a table with feature, label and device columns "
        "(docs/examples/README.md)",
    )
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--seed", type=int, default=0)
    scenario = parser.add_argument_group("with --dataset")
    scenario.add_argument("--devices", type=int, help="number of shards")
    scenario.add_argument(
        "--data-dir", help="folder of the data sets (default: $SKIPFLEET_DATA_DIR)"
    )
    scenario.add_argument(
        "--drift",
        action="store_true",
        help="give devices a drifted stream (X_drift) for --drift-at",
    )
    own = parser.add_argument_group("with --from")
    own.add_argument("--label-column", help="the column of the labels (any values)")
    own.add_argument("--device-column", help="the column naming each row's device")
    own.add_argument(
        "--feature-columns",
        metavar="A,B,...",
        help="the feature columns (default: every other column)",
    )
    own.add_argument(
        "--holdout-devices",
        metavar="D1,D2,...",
        help="the devices held out of pre-training: the fleet, one shard each",
    )
    own.add_argument(
        "--hidden",
        type=int,
        help=f"width of the base model's hidden layers (default {HIDDEN})",
    )
    own.add_argument("--epochs", type=int, help=f"pre-training epochs (default {PRETRAIN_EPOCHS})")
    own.add_argument(
        "--holdout-count",
        type=int,
        metavar="N",
        help="hold out N devices drawn with --seed (default: a quarter)",
    )


def prepare(
    dataset: str,
    devices: int,
    data_dir: Path,
    out: Path,
    *,
    drift: bool,
    seed: int,
    log=print,
) -> dict:
    from skipfleet.scenario import build_scenario

    (out / "shards").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skipfleet-prepare-") as tmp:
        scenario = build_scenario(
            dataset,
            devices,
            data_dir,
            Path(tmp),
            drift=drift,
            seed=seed,
            log=log,
        )
        shutil.copyfile(scenario.base_model, out / BASE_MODEL)
        shards = []
        for k, device in enumerate(scenario.devices):
            shutil.copyfile(device.data_file, shard_path(out, k))
            shards.append(shard_entry(k, device.device_id, device.description, device.drifts))
    manifest = {
        "dataset": dataset,
        "base_model_hash": scenario.base_model_hash,
        "description": scenario.description,
        "shards": shards,
    }
    write_manifest(out, manifest)
    return manifest


def main(args) -> int:
    from agent.data import DataError

    problem = _check_args(args)
    if problem:
        print(f"skipfleet prepare: {problem}", file=sys.stderr)
        return 2
    try:
        manifest = _prepare_from(args) if args.from_file else _prepare_dataset(args)
    except DataError as error:
        print(f"skipfleet prepare: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {BASE_MODEL} ({manifest['base_model_hash'][:12]}), "
        f"{len(manifest['shards'])} shards"
    )
    return 0


def _check_args(args) -> str | None:
    scenario_only = {"--devices": args.devices, "--data-dir": args.data_dir, "--drift": args.drift}
    own_only = {
        "--label-column": args.label_column,
        "--device-column": args.device_column,
        "--feature-columns": args.feature_columns,
        "--holdout-devices": args.holdout_devices,
        "--holdout-count": args.holdout_count is not None,
        "--hidden": args.hidden is not None,
        "--epochs": args.epochs is not None,
    }
    wrong = [k for k, v in (own_only if args.dataset else scenario_only).items() if v]
    if wrong:
        return f"{', '.join(wrong)} go(es) with {'--from' if args.dataset else '--dataset'}"
    if args.dataset and (args.devices is None or args.devices < 1):
        return "--dataset needs --devices N (N >= 1)"
    if args.from_file and not (args.label_column and args.device_column):
        return "--from needs --label-column and --device-column"
    if args.holdout_devices and args.holdout_count is not None:
        return "give --holdout-devices or --holdout-count, not both"
    if any(value is not None and value < 1 for value in (args.hidden, args.epochs)):
        return "--hidden and --epochs must be >= 1"
    return None


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _prepare_dataset(args) -> dict:
    from agent.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir, os.environ)
    return prepare(
        args.dataset,
        args.devices,
        data_dir,
        Path(args.out),
        drift=args.drift,
        seed=args.seed,
        log=_log,
    )


def _prepare_from(args) -> dict:
    from skipfleet.device_table import read_device_table
    from skipfleet.prepare_from import holdout_devices, prepare_from_table

    features = _names(args.feature_columns)
    table = read_device_table(Path(args.from_file), args.label_column, args.device_column, features)
    _log(
        f"{table.source}: {len(table.y)} rows, {table.X.shape[1]} features, "
        f"{len(table.class_names)} classes, {len(table.devices())} devices"
    )
    fleet = holdout_devices(table, _names(args.holdout_devices), args.holdout_count, args.seed)
    return prepare_from_table(
        table,
        fleet,
        Path(args.out),
        hidden=args.hidden or HIDDEN,
        epochs=args.epochs or PRETRAIN_EPOCHS,
        seed=args.seed,
        log=_log,
    )


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]
