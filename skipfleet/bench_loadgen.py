"""The load generator's CPU per simulated device per round, without the coordinator.

`python -m skipfleet.bench_loadgen [--devices 250] [--rounds 4] [--repeat 3] [--side-by-side
TREE]` runs a real load-generator process (skipfleet.loadgen, the bench's data and options)
against a private mosquitto, and plays the coordinator's side of a round from this process:
every device gets a FINETUNE job; once every report is in, a tenth (the canaries) get the new
version on `cmd/adapter` and two EVALUATE jobs (the candidate and the current version); once
those are answered, every device gets the retained desired pointer with the adapter inline and
its APPLY_ADAPTER offer, and the round ends when every offer is answered. Messages are encoded,
and carry MQTT v5 properties, as the coordinator's bridge sends them.

The figure is a generator process's CPU seconds (/proc) over --rounds rounds in a row, per
device per round, for each of --repeat measurements; then its idle CPU (no round: keepalives,
heartbeats) per device per second, which a real round pays for as long as it lasts. On this
shared 2-core machine one process's figures vary by 20 % from run to run; `--side-by-side TREE`
adds a generator running another source tree's code (e.g. `git worktree add --detach DIR main`)
on the same rounds at the same time, so that both see the same load: compare those two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.learner import load_base_model
from shared.mqtt import make_client, packed_publish_properties, parse_broker_url
from shared.protocol import (
    BASE_MODEL_VERSION,
    TERMINAL_STATES,
    AdapterPublication,
    DecodeError,
    DesiredState,
    EvaluateParams,
    FinetuneParams,
    Job,
    JobKind,
    JobStatus,
    Lineage,
    Message,
    Report,
    decode,
    encode_for_publish,
    kind_of,
    topic_kind_for,
)
from shared.topics import Topics
from skipfleet.bench_coordinator import (
    EPOCHS,
    LR,
    broker_config,
    prepare_world,
    raise_fd_limit,
)
from skipfleet.brokers import MosquittoBroker
from skipfleet.loadgen.reference import run_reference
from skipfleet.measure import cpu_by_process
from skipfleet.processes import REPO, child_env

CANARY_FRACTION = 0.1  # the bench's --canary-fraction
DEVICE_SECONDS = 0.02  # a simulated fine-tune (the bench's measured one is ~0.02 s)
COHORT = "default"
SENDER = "coordinator"
IDLE_WINDOW_S = 30.0  # a keepalive and a heartbeat period: every device pings and beats once
WAIT_S = 120.0


class Coordinator:
    """The coordinator's side of a round over MQTT: publishes commands, collects the answers."""

    def __init__(self, broker_url: str, base_model_hash: str) -> None:
        self.base_model_hash = base_model_hash
        self._topics = Topics()
        self._answered: set[str] = set()  # job ids with a report or a terminal status
        self._changed = threading.Condition()
        settings = parse_broker_url(broker_url)
        subscribed = threading.Event()
        self.client = make_client(settings, "bench-coordinator", lean=True)
        self.client.on_message = self._received
        self.client.on_connect = lambda client, *_: client.subscribe(
            [(self._topics.root + "/+/report", 1), (self._topics.root + "/+/job", 1)]
        )
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(settings.host, settings.port)
        self.client.loop_start()
        if not subscribed.wait(WAIT_S):
            raise TimeoutError("the stand-in coordinator did not get its subscriptions")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _received(self, client, userdata, message) -> None:
        try:
            decoded = decode(message.payload).message
        except DecodeError:
            return
        if isinstance(decoded, Report) or (
            isinstance(decoded, JobStatus) and decoded.state in TERMINAL_STATES
        ):
            with self._changed:
                self._answered.add(decoded.job_id)
                self._changed.notify_all()

    def send(self, device: str, message: Message) -> None:
        """As the coordinator's bridge publishes (MqttBridge.publish)."""
        kind = topic_kind_for(kind_of(message))
        topic = self._topics.topic(device, kind)
        for item in encode_for_publish(message, sender=SENDER):
            properties = packed_publish_properties(item.envelope)
            self.client.publish(topic, item.payload, kind.qos, kind.retained, properties)

    def wait(self, job_ids: list[str]) -> None:
        """Until every one of these jobs is answered (a report or a terminal status)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._answered.issuperset(job_ids), WAIT_S):
                missing = sorted(set(job_ids) - self._answered)
                raise TimeoutError(f"{len(missing)} jobs unanswered in {WAIT_S} s: {missing[:5]}")


@dataclass
class RoundPlan:
    devices: list[str]
    arrays: dict
    expires_in_s: float = 600.0

    @property
    def canaries(self) -> list[str]:
        return self.devices[: max(1, round(CANARY_FRACTION * len(self.devices)))]


def play_round(coordinator: Coordinator, plan: RoundPlan, version: int) -> None:
    """One round as the coordinator runs it (coordinator.distribution): fine-tune, canary,
    distribute; returns when every device answered its APPLY_ADAPTER offer."""
    expires = time.time() + plan.expires_in_s
    base_hash = coordinator.base_model_hash
    params = FinetuneParams(epochs=EPOCHS, lr=LR, seed=version)
    jobs = [f"r{version}-finetune-{device}" for device in plan.devices]
    for device, job_id in zip(plan.devices, jobs, strict=True):
        coordinator.send(device, Job(job_id, JobKind.FINETUNE, params, expires, base_hash))
    coordinator.wait(jobs)
    publication = AdapterPublication(
        version, base_hash, COHORT, plan.arrays,
        Lineage(f"round-{version}", (), "exact-delta", version - 1 or None), time.time(),
    )  # fmt: skip
    current = version - 1 or BASE_MODEL_VERSION
    jobs = []
    for device in plan.canaries:
        coordinator.send(device, publication)
        for role, evaluated in (("candidate", version), ("current", current)):
            jobs.append(f"r{version}-{role}-{device}")
            params = EvaluateParams(evaluated)
            coordinator.send(device, Job(jobs[-1], JobKind.EVALUATE, params, expires, base_hash))
    coordinator.wait(jobs)
    jobs = [f"r{version}-apply-{device}" for device in plan.devices]
    for device, job_id in zip(plan.devices, jobs, strict=True):
        pointer = DesiredState(
            version, base_hash, COHORT, only_if_better=False, adapter=publication,
            job_id=job_id, expires_at=expires,
        )  # fmt: skip
        coordinator.send(device, pointer)
    coordinator.wait(jobs)


def process_cpu_s(pid: int) -> float:
    return sum(cpu_by_process([pid]).values())


@dataclass
class Figures:
    round_cpu_ms_per_device: list[float]  # one per repeat: CPU ms / device / round
    idle_cpu_ms_per_device_s: float = 0.0  # CPU ms / device / second with no round

    def line(self, name: str) -> str:
        runs = sorted(self.round_cpu_ms_per_device)
        listed = " ".join(f"{ms:.3f}" for ms in self.round_cpu_ms_per_device)
        return (
            f"{name}: gen CPU ms / device / round: best {runs[0]:.3f} median "
            f"{runs[len(runs) // 2]:.3f} (runs: {listed}); idle CPU ms / device / second: "
            f"{self.idle_cpu_ms_per_device_s:.4f}"
        )


def measure(generators: dict[str, int], coordinator: Coordinator, plan: RoundPlan, rounds: int,
            repeat: int, idle_s: float = IDLE_WINDOW_S) -> dict[str, Figures]:  # fmt: skip
    """Each generator's (name: pid) figures over the same rounds."""
    per_process = len(plan.devices) / len(generators)
    figures = {name: Figures([]) for name in generators}
    version = 1  # the warm-up's
    for _ in range(repeat):
        started = {name: process_cpu_s(pid) for name, pid in generators.items()}
        for _ in range(rounds):
            version += 1
            play_round(coordinator, plan, version)
        for name, pid in generators.items():
            used = process_cpu_s(pid) - started[name]
            figures[name].round_cpu_ms_per_device.append(used / rounds / per_process * 1e3)
    started = {name: process_cpu_s(pid) for name, pid in generators.items()}
    time.sleep(idle_s)
    for name, pid in generators.items():
        used = process_cpu_s(pid) - started[name]
        figures[name].idle_cpu_ms_per_device_s = used / idle_s / per_process * 1e3
    return figures


class Generator:
    """One load-generator process running the code of a source tree (this one by default)."""

    def __init__(self, tree: Path, argv: list[str], workdir: Path, n: int) -> None:
        self.tree = tree
        self.ready = workdir / f"ready-{n}.json"
        self._log = open(workdir / f"loadgen-{n}.log", "wb")  # noqa: SIM115 (closed in stop)
        argv = [*argv, "--ready-file", str(self.ready),
                "--events", str(workdir / f"installs-{n}.jsonl")]  # fmt: skip
        env = child_env(PYTHONPATH=str(tree))
        env["PYTHONPATH"] = str(tree)  # that tree's code only
        self.process = subprocess.Popen(argv, env=env, cwd=tree, stdout=self._log,
                                        stderr=subprocess.STDOUT)  # fmt: skip

    def devices(self, timeout_s: float = WAIT_S) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the generator of {self.tree} did not get ready")
            time.sleep(0.1)
        devices: list[str] = json.loads(self.ready.read_text())["devices"]
        return devices

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def generators(
    root: Path, devices: int, data_dir: Path, device_seconds: float, trees: list[Path]
) -> Iterator[tuple[dict[str, int], Coordinator, RoundPlan]]:
    """A broker, one generator process of `devices` devices per source tree (all online),
    and the stand-in coordinator."""
    raise_fd_limit(2 * devices * len(trees) + 256)
    base, shards = prepare_world(data_dir, root / "world", 1)
    workdir = root / "loadgen"
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        broker = MosquittoBroker(root / "broker", extra_config=broker_config())
        broker.start()
        stack.callback(broker.stop)
        running = []
        for n, tree in enumerate(trees):
            argv = [sys.executable, "-m", "skipfleet.loadgen", "--broker", broker.url,
                    "--base-model", str(base), "--data", str(shards[0]),
                    "--devices", str(devices), "--first-index", str(n * devices),
                    "--device-seconds", str(device_seconds), "--epochs", str(EPOCHS),
                    "--lr", str(LR)]  # fmt: skip
            running.append(Generator(tree, argv, workdir, n))
            stack.callback(running[-1].stop)
        # Interleaved: the stand-in sends to the devices in this order, and the generators
        # should get their messages at the same times (batched alike), not one after the other
        ids = [device for group in zip(*(g.devices() for g in running), strict=True)
               for device in group]  # fmt: skip
        reference = run_reference(base, shards[0], epochs=1, lr=LR)  # the adapter's shapes
        coordinator = Coordinator(broker.url, load_base_model(base).weights_hash)
        stack.callback(coordinator.close)
        names = {f"{tree} [{n}]": g.process.pid for n, (tree, g) in
                 enumerate(zip(trees, running, strict=True))}  # fmt: skip
        yield names, coordinator, RoundPlan(ids, reference.arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--devices", type=int, default=250, help="per generator process (the bench's: 250)")
    add("--rounds", type=int, default=4, help="rounds a measurement")
    add("--repeat", type=int, default=3, help="measurements; the best counts")
    add("--idle-seconds", type=float, default=IDLE_WINDOW_S, help="of the idle measurement")
    add("--device-seconds", type=float, default=DEVICE_SECONDS)
    add("--side-by-side", type=Path, action="append", default=[], metavar="TREE",
        help="also a generator running this source tree's code (a worktree of main), on the "
        "same rounds at the same time: an A/B that the machine's load hits alike")  # fmt: skip
    add(
        "--data-dir",
        type=Path,
        default=os.environ.get("SKIPFLEET_DATA_DIR"),
        help="the data sets (fan damage1), as the bench's (default: $SKIPFLEET_DATA_DIR)",
    )
    add("--work-dir", type=Path, help="keep the logs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    if args.data_dir is None:
        parser.error("--data-dir (or $SKIPFLEET_DATA_DIR) is needed")
    trees = [REPO, *(tree.resolve() for tree in args.side_by_side)]
    with contextlib.ExitStack() as stack:
        root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        setup = generators(root, args.devices, args.data_dir, args.device_seconds, trees)
        pids, coordinator, plan = stack.enter_context(setup)
        play_round(coordinator, plan, 1)  # a warm-up: first-use costs out of the figure
        figures = measure(pids, coordinator, plan, args.rounds, args.repeat, args.idle_seconds)
    print(f"{args.devices} devices a generator process, {args.rounds} rounds a measurement")
    print("\n".join(f.line(name) for name, f in figures.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
