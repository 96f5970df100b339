"""`skipfleet simulate`: a whole fleet on this machine, end to end (the README's main command).

A broker (yours, else a private mosquitto: none installed is a clear error), the coordinator on
a local Ray, and one agent process per device, each owning its drifted data (skipfleet.scenario).
It runs federated runs (rounds per cluster until the gain stops), shows progress, and ends with a
per-device table (what each device runs, and why), JSON and an HTML report. With --drift-at the
devices' input switches mid-run and the coordinator starts the run by itself (fan: the calibrated
label-free drift score; HAR: the accuracy the devices measure when asked). With --new-devices,
devices without labels join after the run and get their cluster's adapter if it helps them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shared.config_file import prepare_parser

BROKER_PROBE_S = 5.0  # --broker must answer a CONNECT within this
DEFAULT_EPOCHS = {"fan": 100, "har": 200, "fmnist": 10}  # the papers' (fan: Damage1)
DEFAULT_LR = {"fan": 0.05, "har": 0.02, "fmnist": 0.02}


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--devices", type=int, help="number of simulated devices (default 6)")
    add("--dataset", choices=("har", "fan", "fmnist"), help="default fan")
    add("--fleet-dir", metavar="DIR", help="a fleet from `skipfleet prepare --out DIR` "
        "(your own task with --from): every shard a device, instead of --dataset")  # fmt: skip
    add("--runs", type=int, default=1, help="federated runs to request (with --drift-at the "
        "coordinator starts the first itself)")  # fmt: skip
    add("--max-rounds", type=int, default=8, help="rounds a run may take at most")
    add(
        "--new-devices",
        type=int,
        default=0,
        help="devices without labels that join after the first run (fan: up to 3, har: 3)",
    )
    add("--new-at", type=float, metavar="SECONDS", help="when they join (default: after the run)")
    add("--data-dir", help="folder of the data sets (default: $SKIPFLEET_DATA_DIR)")
    add("--broker", help="mqtt://host:port of a broker to use (default: start one)")
    add(
        "--ray-address",
        default="local",
        help="local (the coordinator starts a small Ray) or a cluster to join",
    )
    add(
        "--drift-at",
        type=float,
        metavar="SECONDS",
        help="switch every device to its drifted data this long after it starts",
    )
    add("--json", metavar="OUT", help="write the results as JSON")
    add("--report", metavar="OUT.html", help="write an HTML report with charts")
    add("--run-dir", help="where logs and state go (default: out/simulate-TIMESTAMP)")
    add(
        "--keep-running",
        action="store_true",
        help="after the scenario (and its table, JSON and report), keep the fleet and the "
        "coordinator's dashboard running until Ctrl-C or SIGTERM",
    )
    add("--timeout", type=float, default=300.0, help="seconds any one phase may take")
    add("--seed", type=int, default=0, help="seed of the scenario (data shards, device order)")
    prepare_parser(parser, "simulate", {"data_dir": "SKIPFLEET_DATA_DIR"})


def main(args) -> int:
    from agent.data import DataError
    from shared.config_file import EXIT_USAGE, ConfigFileError, resolve_args
    from shared.mqtt import BrokerUnreachable
    from skipfleet.brokers import MosquittoMissing, find_mosquitto
    from skipfleet.coordinator_process import ApiError
    from skipfleet.stopping import Stopped, stop_on_signals, sweep

    try:  # flags, environment, config file ([simulate]) and defaults merged once, here
        args = resolve_args(args, os.environ)
    except ConfigFileError as err:
        print(f"skipfleet simulate: {err}", file=sys.stderr)
        return EXIT_USAGE
    problems = _check_args(args)
    if problems:
        print(f"skipfleet simulate: {problems}", file=sys.stderr)
        return 2
    if not args.broker and find_mosquitto() is None:  # before minutes of pre-training
        print(f"skipfleet simulate: {MosquittoMissing()}", file=sys.stderr)
        return 1
    run_dir = Path(args.run_dir or f"out/simulate-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    with stop_on_signals():  # SIGTERM/SIGINT: stop the broker, coordinator, Ray and agents
        try:
            check_broker(args.broker)
            prepared, data_dir = _fleet(args)
            from skipfleet.sim_run import Simulation

            simulation = Simulation(args, data_dir, run_dir, prepared)
            # with --keep-running the outputs are written while everything still runs, and the
            # JSON again at the end, with the retained messages removed on the way out (a stop
            # signal is then how the run ends: sim_run.keep_running returns)
            result = simulation.run(lambda result: _write_outputs(args, result))
        except Stopped as stopped:
            left = sweep(stopped)
            print(f"skipfleet simulate: stopped by {stopped}: the broker, coordinator, Ray and "
                  f"agents it started are stopped{_swept(left)}\n  logs: {run_dir}",
                  file=sys.stderr)  # fmt: skip
            return stopped.exit_code
        except (DataError, ApiError, TimeoutError, RuntimeError, BrokerUnreachable) as error:
            print(f"skipfleet simulate: {error}\n  logs: {run_dir}", file=sys.stderr)
            return 1
    _write_outputs(args, result, only_json=args.keep_running)
    return 0


def _swept(pids: list[int]) -> str:
    return f" ({len(pids)} that did not stop in time were killed)" if pids else ""


def check_broker(url: str | None) -> None:
    """A broker given with --broker must answer now (a few seconds), before minutes of
    pre-training and a coordinator that would wait for it until --timeout."""
    if url:
        from shared.mqtt import BrokerUnreachable, parse_broker_url, probe_broker

        try:
            settings = parse_broker_url(url)
        except ValueError as err:
            raise BrokerUnreachable(f"--broker: {err}") from None
        probe_broker(settings, BROKER_PROBE_S)


DEFAULT_DATASET, DEFAULT_DEVICES = "fan", 6


def _fleet(args):
    """(the prepared fleet, None) with --fleet-dir, else (None, the data sets' folder); the
    defaults of --dataset and --devices are set here."""
    from agent.data import resolve_data_dir

    if args.fleet_dir is None:
        args.dataset = args.dataset or DEFAULT_DATASET
        args.devices = args.devices or DEFAULT_DEVICES
        return None, resolve_data_dir(args.data_dir, os.environ)
    from agent.data import DataError
    from skipfleet.prepared import load_prepared_fleet

    prepared = load_prepared_fleet(Path(args.fleet_dir))
    if args.drift_at is not None and not any(d.drifts for d in prepared.devices):
        raise DataError(f"{args.fleet_dir}: no shard has a drifted stream for --drift-at "
                        "(prepare --dataset ... --drift makes them)")  # fmt: skip
    args.dataset, args.devices = prepared.dataset, len(prepared.devices)
    return prepared, None


def _check_args(args) -> str | None:
    if args.fleet_dir is not None:
        # a data dir from $SKIPFLEET_DATA_DIR is the machine's, not a choice made for this run
        data_dir_from_env = (
            getattr(args, "_config_sources", {}).get("data_dir", "").startswith("env:")
        )
        given = {"--dataset": args.dataset, "--devices": args.devices,
                 "--data-dir": None if data_dir_from_env else args.data_dir,
                 "--new-devices": args.new_devices}  # fmt: skip
        wrong = [option for option, value in given.items() if value]
        if wrong:
            return f"--fleet-dir brings its devices and data: drop {', '.join(wrong)}"
    if args.devices is not None and args.devices < 1:
        return "--devices must be >= 1"
    if args.runs < 0:
        return "--runs must be >= 0"
    if args.max_rounds < 1:
        return "--max-rounds must be >= 1"
    if args.new_devices < 0:
        return "--new-devices must be >= 0"
    if args.drift_at is not None and args.drift_at < 0:
        return "--drift-at must be >= 0"
    return None


def _write_outputs(args, result: dict, only_json: bool = False) -> None:
    from skipfleet.sim_results import format_table

    if not only_json:
        print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.report and not only_json:
        from skipfleet.report_html import render

        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(render(result))
        print(f"wrote {args.report}")
