"""`skipfleet bench coordinator`: the coordinator under a simulated fleet of N devices, measured.

For each fleet size: a private mosquitto, `skipfleet coordinator` as a process (its own local
Ray unless --ray-address), and the load generator (skipfleet.loadgen: simulated devices on the
real protocol, many per process) over several processes. Once every device is online in the
API, each of --rounds rounds is `POST /finetune {"all": true}`, timed until every device runs
the promoted version (skipfleet.bench_coordinator_round). Then the aggregation strategies alone
over synthetic reports (skipfleet.bench_aggregation).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from agent.data.dataset import Dataset
from agent.data.fan import load_fan_split
from agent.device_data import write_device_file
from agent.trainer.finetune import pretrain
from skipfleet import bench_aggregation
from skipfleet.bench_coordinator_round import Parties, RoundFailed, run_round, wait_for
from skipfleet.bench_coordinator_tables import format_tables, scale_summary
from skipfleet.brokers import MosquittoBroker
from skipfleet.coordinator_process import ApiError, CoordinatorProcess
from skipfleet.loadgen.fleet import SimulatedFleet
from skipfleet.measure import (
    COORDINATOR,
    Memory,
    PeakMemory,
    descendant_running,
    memory_by_role,
    memory_of,
)
from skipfleet.ray_nodes import NO_TOKEN_AUTH, LocalRayCluster

# One asyncio loop carried 1,000 clients (skipfleet.loadgen.connection); 250 per process lets
# the generators use both cores without one process per handful of devices.
DEVICES_PER_PROCESS = 250
EPOCHS, LR = 30, 0.02  # the coordinator's default fine-tune, also the reference run's
FD_HEADROOM = 256
COUNTERS_LAG_S = 2.5  # the coordinator's metrics interval (2 s) and a margin
IDLE_WINDOW_S = 10.0


def broker_config() -> list[str]:
    """mosquitto for a thousand clients: no connection cap, and a deep per-client queue so the
    coordinator's subscription does not drop QoS 1 messages behind a burst of reports (the
    default of 1,000 queued messages would); snapshots every minute, not every second."""
    return [
        "max_connections -1",
        "max_queued_messages 1000000",
        "set_tcp_nodelay true",
        "autosave_interval 60",
    ]


def coordinator_knobs(devices: int, args, cluster: LocalRayCluster | None = None) -> list[str]:
    """Rounds only when the benchmark asks, one round a run (the round is what is measured);
    every device fine-tunes at once; a tenth canaries. With --partitions N: N partitions, on
    the bench's own multi-node Ray (--ray-nodes) partition i pinned to node i mod nodes."""
    knobs = {
        "--max-concurrent-jobs": str(devices),
        "--max-rounds": "1",
        "--accuracy-threshold": "off",
        "--accuracy-drop-margin": "off",
        "--drift-threshold": "off",
        "--label-free-threshold": "off",
        "--heartbeat-timeout-seconds": str(3 * args.heartbeat_seconds),
        "--round-deadline-seconds": str(args.round_timeout),
        "--job-timeout-seconds": str(args.round_timeout),
        "--canary-fraction": "0.1",
        "--canary-margin": "0.05",
        "--canary-deadline-seconds": str(args.round_timeout),
        "--epochs": str(EPOCHS),
        "--lr": str(LR),
        "--ray-address": args.ray_address if cluster is None else cluster.address,
    }
    if knobs["--ray-address"] != "local":  # joining a shared Ray: a name of our own there
        knobs["--actor-name"] = f"bench-{os.getpid()}-{devices}"
    if args.partitions > 1:
        knobs["--partitions"] = str(args.partitions)
    if cluster is not None:
        nodes = cluster.resources
        pinned = [nodes[i % len(nodes)] for i in range(args.partitions)]
        knobs["--partition-resources"] = ",".join(pinned)
    return [item for pair in knobs.items() for item in pair]


def cohorts_for(base_model: Path, partitions: int) -> list[str] | None:
    """One device cohort per partition (the agents' --cohort), each owned by its partition;
    None with one partition: every device in the default cohort, as always."""
    if partitions == 1:
        return None
    from agent.learner import load_base_model
    from coordinator.fleet import task_name
    from coordinator.partitions import partition_of
    from coordinator.registry import cohort_id

    base_hash = load_base_model(base_model).weights_hash
    found: dict[int, str] = {}
    for name in (f"fleet{n}" for n in range(100 * partitions)):
        found.setdefault(partition_of(cohort_id(base_hash, task_name(name)), partitions), name)
        if len(found) == partitions:
            return [found[p] for p in range(partitions)]
    raise RuntimeError(f"no cohort names covering {partitions} partitions")


def loadgen_options(args) -> list[str]:
    options = ["--heartbeat-seconds", str(args.heartbeat_seconds), "--epochs", str(EPOCHS),
               "--lr", str(LR)]  # fmt: skip
    if args.device_seconds is not None:
        options += ["--device-seconds", str(args.device_seconds)]
    return options


def prepare_world(data_dir: Path, root: Path, shards: int) -> tuple[Path, list[Path]]:
    """A fan base model pre-trained on Damage1's silent room; the noisy room split into one
    interleaved shard per load-generator process (its own data, its own reference run)."""
    root.mkdir(parents=True, exist_ok=True)
    silent = load_fan_split(data_dir, "damage1", "pretrain")
    noisy = load_fan_split(data_dir, "damage1", "finetune")
    pretrain(silent.X, silent.y, 3, epochs=20, lr=0.05, seed=0).save(root / "base.npz")
    files = []
    for p in range(shards):
        rows = np.arange(p, len(noisy), shards)
        files.append(root / f"shard-{p}.npz")
        write_device_file(files[-1], Dataset(noisy.X[rows], noisy.y[rows], 3, {}))
    return root / "base.npz", files


def raise_fd_limit(needed: int) -> None:
    """Children inherit it: mosquitto holds a socket per client, each generator one per device."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def processes_for(devices: int, asked: int | None, partitions: int = 1) -> int:
    """Load generators: with several partitions a multiple of them (one cohort a process)."""
    wanted = asked or max(1, math.ceil(devices / DEVICES_PER_PROCESS))
    return partitions * math.ceil(wanted / partitions)


def bench_fleet(devices: int, args, world: tuple[Path, list[Path]], root: Path, log) -> dict:
    """A broker, a coordinator and the simulated fleet for this size; --rounds rounds on it."""
    processes = processes_for(devices, args.processes, args.partitions)
    raise_fd_limit(2 * devices + FD_HEADROOM)
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.ray_nodes > 1:
            cpus = max(1, (os.cpu_count() or 2) // args.ray_nodes)
            cluster = stack.enter_context(LocalRayCluster(args.ray_nodes, cpus, root / "ray"))
        knobs = coordinator_knobs(devices, args, cluster)
        broker = MosquittoBroker(root / "broker", extra_config=broker_config())
        broker.start()
        stack.callback(broker.stop)
        launched = time.monotonic()
        coordinator = CoordinatorProcess(broker.url, root / "state", root / "coordinator.log",
                                         knobs, env=NO_TOKEN_AUTH if cluster else None)  # fmt: skip
        stack.callback(coordinator.stop)
        coordinator.wait_healthy(args.round_timeout)
        startup_s = time.monotonic() - launched  # process start to GET /health answering ok
        fleet = SimulatedFleet(broker.url, world[0], world[1], devices, processes,
                               root / "loadgen", options=loadgen_options(args),
                               cohorts=cohorts_for(world[0], args.partitions))  # fmt: skip
        stack.callback(fleet.stop)
        started = time.monotonic()
        ready = fleet.start(args.round_timeout)
        wait_for(f"{devices} devices online in the API", lambda: _online(coordinator, devices),
                 args.round_timeout, 1.0)  # fmt: skip
        online_s = time.monotonic() - started
        log(f"{devices} devices: online in {online_s:.1f} s over {processes} processes")
        result = {
            "devices": devices,
            "processes": processes,
            "coordinator_startup_seconds": startup_s,
            "coordinator_knobs": knobs,
            "partitions": args.partitions,
            "ray_nodes": args.ray_nodes,
            "online_seconds": online_s,
            "reference": [r["reference"] | {"device_seconds": r["device_seconds"]} for r in ready],
            "loadgen_connected_seconds": max(r["connected_seconds"] for r in ready),
        }
        broker_pid = descendant_running(os.getpid(), str(broker.config_path))
        lag = COUNTERS_LAG_S if args.partitions > 1 else 0.0
        nodes = tuple(cluster.pids if cluster else ())
        parties = Parties(coordinator, broker_pid, fleet, nodes, lag)
        result["memory_idle"] = _memory(parties)
        result["memory_idle_by_role"] = _pss_by_role(
            memory_by_role(coordinator.pid, parties.coordinator_tree())
        )
        result["idle_cpu_per_second"] = idle_cpu(parties)
        with PeakMemory(parties.coordinator_tree, driver=coordinator.pid) as peak:
            result |= run_rounds(parties, devices, args, log)
        result["memory_peak_pss_bytes"] = peak.peak.pss_bytes
        result["memory_peak_by_role"] = _pss_by_role(peak.at_peak)
        result["memory_role_peaks"] = _pss_by_role(peak.role_peaks)
        result["memory_after"] = _memory(parties)
        result["scale"] = scale_summary(result)
        return result


def run_rounds(parties: Parties, devices: int, args, log) -> dict:
    rounds = []
    for number in range(1, args.rounds + 1):
        try:
            rounds.append(run_round(parties, devices, args.round_timeout))
        except (RoundFailed, ApiError) as err:
            log(f"{devices} devices: round {number} failed: {err}")
            return {"rounds": rounds, "failure": f"round {number}: {err}"}
        log(f"{devices} devices: round {number} in {rounds[-1]['latency_seconds']:.2f} s")
    return {"rounds": rounds, "failure": None}


def idle_cpu(parties: Parties) -> dict:
    """CPU seconds a second with every device online and no round: heartbeats, ticks, and
    Ray's own daemons (per node, with --ray-nodes; per process role, `role <name>`), over
    IDLE_WINDOW_S."""
    with parties.cpu_window() as cpu, parties.node_window() as nodes:
        time.sleep(IDLE_WINDOW_S)
        used = cpu.seconds() | ({f"by_{k}": v for k, v in nodes.seconds().items()
                                 if k != "other"} if nodes else {})  # fmt: skip
        used |= {f"role {k}": v for k, v in cpu.seconds_by_label(COORDINATOR).items()}
    return {name: seconds / IDLE_WINDOW_S for name, seconds in used.items()}


def _online(coordinator: CoordinatorProcess, devices: int) -> bool:
    listed = coordinator.api.get("/devices")
    return sum(1 for d in listed if d["online"] and d["cohort"]) >= devices


def _memory(parties: Parties) -> dict:
    """The coordinator process alone, and with everything it started (Ray's processes) or
    joined (the bench's own Ray nodes)."""
    driver = memory_of([parties.coordinator.pid])
    tree = memory_of(parties.coordinator_tree())
    return {
        "driver_rss_bytes": driver.rss_bytes,
        "driver_pss_bytes": driver.pss_bytes,
        "tree_rss_bytes": tree.rss_bytes,
        "tree_pss_bytes": tree.pss_bytes,
        "tree_processes": tree.processes,
    }


def _pss_by_role(roles: dict[str, Memory]) -> dict[str, dict[str, int]]:
    return {role: {"pss_bytes": m.pss_bytes, "processes": m.processes} for role, m in roles.items()}


def main(args) -> int:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    sizes = [int(n) for n in args.devices.split(",")]
    shards = max(processes_for(n, args.processes, args.partitions) for n in sizes)
    fleets = {}
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            root = Path(args.work_dir)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skipfleet-bench-")))
        world = prepare_world(args.data_dir, root / "world", shards)
        for devices in sizes:
            fleets[str(devices)] = bench_fleet(devices, args, world, root / str(devices), log)
    aggregation = bench_aggregation.run([int(n) for n in args.aggregation_sizes.split(",")])
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "settings": _settings(args),
        "fleets": fleets,
        "aggregation_micro": aggregation,
    }  # fmt: skip
    print(format_tables(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(f["failure"] is None for f in fleets.values()) else 1


def _settings(args) -> dict:
    return {
        "rounds": args.rounds,
        "partitions": args.partitions,
        "ray_nodes": args.ray_nodes,
        "processes": args.processes or f"ceil(devices / {DEVICES_PER_PROCESS})",
        "heartbeat_seconds": args.heartbeat_seconds,
        "device_seconds": args.device_seconds or "measured (the reference fine-tune's seconds)",
        "round_timeout_seconds": args.round_timeout,
        "max_concurrent_jobs": "the fleet size",
        "broker_config": broker_config(),
        "loadgen_options": loadgen_options(args),
        "data": "fan damage1: base pre-trained on the silent room (20 epochs), devices on "
        "interleaved shards of the noisy room, one shard per load-generator process",
    }
