"""`skipfleet bench TARGET`: benchmarks that print their figures (never timed unit tests)."""

from __future__ import annotations

import argparse
import os
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    trainer = targets.add_parser("trainer", help="the paper's eight fine-tuning methods compared")
    add_data_dir(trainer)
    trainer.add_argument("--dataset", choices=(*MLP_DATASETS, *CNN_DATASETS), required=True)
    trainer.add_argument("--methods", default="all", help="all, or a comma-separated list")
    trainer.add_argument("--trials", type=positive_int, help="default: 20 (MLP), 5 (CNN)")
    trainer.add_argument("--epochs", type=positive_int, help="default: the paper's per data set")
    trainer.add_argument(
        "--lr", type=float, help="SGD step size (default: 0.05 fan, 0.02 har, fmnist)"
    )
    trainer.add_argument("--pretrain-epochs", type=positive_int, help="default: 100 (MLP), 2 (CNN)")
    add_cnn_options(trainer)
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument(
        "--drift-subjects", type=int, nargs="+", metavar="S",
        help="HAR subjects whose data drifts (default: the paper's 9 14 16 19 25)",
    )  # fmt: skip
    trainer.add_argument(
        "--har-split", choices=("experiment", "random"), default="experiment",
        help="fine-tune/test split of the drifted HAR windows (default: by recording, "
        "leakage-free; 'random' is the paper's style)",
    )  # fmt: skip
    trainer.add_argument("--json", metavar="OUT", help="write the results as JSON")
    agent = targets.add_parser(
        "agent", help="agent memory, report sizes and job latency through a real broker"
    )
    add_data_dir(agent)
    agent.add_argument("--datasets", default="damage1,damage2,har", help="comma-separated")
    agent.add_argument("--jobs", type=positive_int, default=5, help="jobs of each kind (default 5)")
    agent.add_argument("--json", metavar="OUT", help="write the results as JSON")
    add_coordinator(targets)
    add_federation(targets)
    add_drift(targets)
    add_faults(targets)
    add_delivery(targets)
    shutdown = targets.add_parser(
        "shutdown",
        help="a local-Ray coordinator stopped by SIGTERM and killed by SIGKILL: seconds until "
        "nothing it started runs, and what is left",
    )
    shutdown.add_argument("--trials", type=positive_int, default=3, help="of each (default 3)")
    shutdown.add_argument("--json", metavar="OUT", help="write the results as JSON")


def add_faults(targets) -> None:
    faults = targets.add_parser(
        "faults",
        help="issue 10's fault and attack scenarios end to end: reports lost, applied twice, "
        "honest devices harmed, time to recover",
    )
    add_data_dir(faults)
    add = faults.add_argument
    add("--rounds", type=positive_int, default=10, help="rounds with a poisoning device")
    add("--repeats", type=positive_int, default=20,
        help="runs of the poisoning scenario (training seeds differ run to run)")  # fmt: skip
    add("--devices", type=positive_int, default=3, help="honest devices (agents in the live part)")
    add("--steps", type=positive_int, default=60_000,
        help="SGD steps of a live fine-tune (long enough to fault a round mid-way)")  # fmt: skip
    add("--outage", type=float, default=120.0, help="seconds of the agent's network outage")
    add("--seed", type=int, default=0)
    add("--skip-live", action="store_true", help="only the in-process trust scenarios")
    add(
        "--only-coordinators",
        action="store_true",
        help="only the two-coordinators scenarios (two `skipfleet coordinator` on one broker)",
    )
    add("--side-by-side", type=float, default=30.0,
        help="seconds two coordinators with an account each run side by side")  # fmt: skip
    add("--work-dir", help="keep every log and state dir here (default: a temporary dir)")
    add("--json", metavar="OUT", help="write the results as JSON")


def add_delivery(targets) -> None:
    delivery = targets.add_parser(
        "delivery",
        help="an agent's reports across a network outage through a real mosquitto: "
        "sent, lost, duplicated",
    )
    add = delivery.add_argument
    add("--outage-seconds", type=float, default=120.0, help="the link is down this long")
    add("--cut", choices=[m.value for m in _cut_modes()], default="blackhole",
        help="blackhole: a dead link only keepalive notices (default); refuse: reset")  # fmt: skip
    add("--rate", type=float, default=2.0, help="reports per second the agent makes")
    add("--before-seconds", type=float, default=10.0, help="reporting before the outage")
    add("--after-seconds", type=float, default=10.0, help="reporting after the outage")
    add("--keepalive", type=positive_int, default=10, help="the agent's MQTT keepalive (s)")
    add("--json", metavar="OUT", help="write the results as JSON")


def _cut_modes():
    from skipfleet.fleet.base import CutMode

    return CutMode


def add_federation(targets) -> None:
    from coordinator.clustering import DEFAULT_CLUSTER_DISTANCE
    from coordinator.federation import FederationPolicy
    from skipfleet.federation_scenarios import SCENARIOS

    defaults = FederationPolicy()
    federation = targets.add_parser(
        "federation",
        help="per strategy (base, own, one cohort, clustered, pooled): accuracy and devices "
        "made worse, over seeds, on a scenario fleet of real data",
    )
    add_data_dir(federation)
    add = federation.add_argument
    add("--scenario", choices=sorted(SCENARIOS), required=True)
    add("--dataset", help="the scenario's data set (each scenario has one; checked)")
    add("--seeds", type=positive_int, default=5, help="seeds, each with its own base model")
    add("--method", default="skip2-delta", help="what devices train (default skip2-delta)")
    add("--lr", type=float, help="SGD step size (default 0.02, the coordinator's)")
    add("--algorithm", default="coordinate-median",
        choices=("exact-delta", "coordinate-median", "trimmed-mean"),
        help="how a cluster's reports are combined (default: the coordinator's)")  # fmt: skip
    add("--steps", type=positive_int, default=defaults.steps, help="SGD steps per round")
    add("--max-rounds", type=positive_int, default=defaults.max_rounds)
    add("--min-gain", type=float, default=defaults.min_gain,
        help="stop a run when an aggregate gains less hold-out accuracy than this")  # fmt: skip
    add("--cluster-distance", type=float, default=DEFAULT_CLUSTER_DISTANCE,
        help="DP-means radius, in in-distribution standard deviations")  # fmt: skip
    add("--json", metavar="OUT", help="write the results as JSON")


def add_drift(targets) -> None:
    drift = targets.add_parser(
        "drift", help="AUROC of each label-free drift score for harmful drift (fan, HAR)"
    )
    add_data_dir(drift)
    drift.add_argument("--dataset", choices=("fan", "har"), required=True)
    drift.add_argument(
        "--seeds", type=positive_int, default=10,
        help="base models (and, on HAR, new subjects) drawn (default 10)",
    )  # fmt: skip
    drift.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    drift.add_argument("--pretrain-epochs", type=positive_int, default=40,
                       help="as simulate's base model (default 40)")  # fmt: skip
    drift.add_argument("--json", metavar="OUT", help="write the results as JSON")


MLP_DATASETS = ("damage1", "damage2", "har")
CNN_DATASETS = ("fmnist-rot75", "fmnist-unseen")  # skipfleet/bench_cnn.py


def add_cnn_options(trainer) -> None:
    add = trainer.add_argument
    add(
        "--model",
        choices=("cnn", "dwcnn"),
        default="cnn",
        help="the CNN of the fmnist data sets: standard or depthwise-separable (default cnn)",
    )
    add(
        "--ranks",
        metavar="R,R,..",
        help="LoRA ranks / adapter widths, e.g. 1,2,4,8 for a sweep (fmnist data sets; default 4)",
    )
    add(
        "--pretrain-samples",
        type=positive_int,
        help="pre-train on this many train images (fmnist data sets; default all 58,976)",
    )
    add(
        "--tap-pool",
        type=positive_int,
        choices=(1, 2),
        default=2,
        help="average pooling of the second layer's map before its Skip adapter (default 2)",
    )


def add_coordinator(targets) -> None:
    coordinator = targets.add_parser(
        "coordinator",
        help="round latency, messages/s, aggregation time and memory of the coordinator "
        "under a simulated fleet (skipfleet.loadgen)",
    )
    add_data_dir(coordinator)
    add = coordinator.add_argument
    add("--devices", default="10,100,1000", help="fleet sizes, comma-separated")
    add("--processes", type=positive_int, help="load-generator processes (default: 1 per 250)")
    add("--rounds", type=positive_int, default=3, help="rounds per fleet size (default 3)")
    add("--device-seconds", type=float, help="a simulated fine-tune's duration (default: "
        "the measured seconds of each generator's one real fine-tune)")  # fmt: skip
    add("--heartbeat-seconds", type=float, default=30.0, help="device heartbeats (default 30)")
    add("--round-timeout", type=float, default=900.0, help="seconds a round may take")
    add("--aggregation-sizes", default="10,100,1000,10000",
        help="report counts of the aggregation micro-benchmark")  # fmt: skip
    add("--ray-address", default="local",
        help="'local' (default: the coordinator starts its own Ray) or a Ray to join")  # fmt: skip
    add("--partitions", type=positive_int, default=1,
        help="split the fleet by cohort over this many coordinator partitions (one cohort "
        "per partition, one per load-generator process; default 1)")  # fmt: skip
    add("--ray-nodes", type=positive_int, default=1,
        help="start a local Ray of this many nodes (ray start), each a stand-in for one "
        "more machine; partition i is pinned to node i mod N (default 1: no such Ray)")  # fmt: skip
    add("--work-dir", help="keep every log and state dir here (default: a temporary dir)")
    add("--json", metavar="OUT", help="write the results as JSON")


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", metavar="DIR",
        help="folder of the data sets (default: $SKIPFLEET_DATA_DIR)",
    )  # fmt: skip


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(args) -> int:
    from agent.data import DataError, resolve_data_dir
    from agent.trainer.blas import limit_blas_threads

    limit_blas_threads(1)
    if args.target == "delivery":  # no data sets: reports of fixed size through a broker
        from skipfleet import bench_delivery

        return bench_delivery.main(args)
    if args.target == "shutdown":  # no data sets: a coordinator and a broker
        from skipfleet import bench_shutdown

        return bench_shutdown.main(args)
    try:
        args.data_dir = resolve_data_dir(args.data_dir, os.environ)
    except DataError as error:
        print(f"skipfleet bench: {error}", file=sys.stderr)
        return 2
    if args.target == "trainer":
        from skipfleet import bench_trainer

        bench_module = bench_trainer
        if args.dataset in CNN_DATASETS:
            from skipfleet import bench_cnn as bench_module
        else:
            args.trials = args.trials or 20
            args.pretrain_epochs = args.pretrain_epochs or 100
        try:
            return bench_module.main(args)
        except (DataError, ValueError) as error:
            print(f"skipfleet bench trainer: {error}", file=sys.stderr)
            return 2
    if args.target == "federation":
        from skipfleet import bench_federation
        from skipfleet.federation_scenarios import SCENARIOS

        expected = SCENARIOS[args.scenario][0]
        if args.dataset not in (None, expected):
            print(f"skipfleet bench federation: {args.scenario} runs on {expected}, "
                  f"not {args.dataset}", file=sys.stderr)  # fmt: skip
            return 2
        try:
            return bench_federation.main(args, args.data_dir)
        except (DataError, ValueError) as error:
            print(f"skipfleet bench federation: {error}", file=sys.stderr)
            return 2
    if args.target == "coordinator":
        from skipfleet import bench_coordinator as bench_module
    elif args.target == "drift":
        from skipfleet import bench_drift as bench_module
    elif args.target == "faults":
        from skipfleet import bench_faults as bench_module
    else:
        from skipfleet import bench_agent as bench_module
    try:
        return bench_module.main(args)
    except (DataError, ValueError, TimeoutError) as error:
        print(f"skipfleet bench {args.target}: {error}", file=sys.stderr)
        return 2
