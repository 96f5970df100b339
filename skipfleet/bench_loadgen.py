"""The load generator's CPU per simulated device per round, without the coordinator.

`python -m skipfleet.bench_loadgen [--devices 250] [--rounds 4] [--repeat 3]` runs ONE real
load-generator process (skipfleet.loadgen, the bench's data and options) against a private
mosquitto, and plays the coordinator's side of a round from this process: every device gets a
FINETUNE job; once every report is in, a tenth (the canaries) get the new version on
`cmd/adapter` and two EVALUATE jobs (the candidate and the current version); once those are
answered, every device gets the retained desired pointer with the adapter inline and its
APPLY_ADAPTER offer, and the round ends when every offer is answered. Messages are encoded,
and carry MQTT v5 properties, as the coordinator's bridge sends them.

The figure is the generator process's CPU seconds (/proc) over --rounds rounds in a row, per
device per round; the best of --repeat measurements (each one more set of rounds on the same
fleet), so it is repeatable on a shared machine. Its idle CPU (no round: keepalives, heartbeats)
per device per second is measured too: a real round pays it for as long as the round lasts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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
from skipfleet.loadgen.fleet import SimulatedFleet
from skipfleet.loadgen.reference import run_reference
from skipfleet.measure import cpu_by_process

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
    idle_cpu_ms_per_device_s: float  # CPU ms / device / second with no round
    round_seconds: list[float]  # wall seconds per round, per repeat

    def lines(self, devices: int, rounds: int) -> list[str]:
        best = min(self.round_cpu_ms_per_device)
        runs = " ".join(f"{ms:.3f}" for ms in self.round_cpu_ms_per_device)
        walls = " ".join(f"{s:.2f}" for s in self.round_seconds)
        return [
            f"devices {devices} in one generator process, {rounds} rounds a measurement",
            f"gen CPU ms / device / round: best {best:.3f} (runs: {runs})",
            f"gen idle CPU ms / device / second: {self.idle_cpu_ms_per_device_s:.4f}",
            f"round wall s (each measurement's mean): {walls}",
        ]


def measure(fleet: SimulatedFleet, coordinator: Coordinator, plan: RoundPlan, rounds: int,
            repeat: int, idle_s: float = IDLE_WINDOW_S) -> Figures:  # fmt: skip
    (pid,) = fleet.pids
    cpu, walls = [], []
    version = 1  # the warm-up's
    for _ in range(repeat):
        started, wall = process_cpu_s(pid), time.monotonic()
        for _ in range(rounds):
            version += 1
            play_round(coordinator, plan, version)
        cpu.append((process_cpu_s(pid) - started) / rounds / len(plan.devices) * 1e3)
        walls.append((time.monotonic() - wall) / rounds)
    started = process_cpu_s(pid)
    time.sleep(idle_s)
    idle = (process_cpu_s(pid) - started) / idle_s / len(plan.devices) * 1e3
    return Figures(cpu, idle, walls)


@contextlib.contextmanager
def generator(
    root: Path, devices: int, data_dir: Path, device_seconds: float
) -> Iterator[tuple[SimulatedFleet, Coordinator, RoundPlan]]:
    """A broker, one generator process of `devices` devices (all online), the stand-in."""
    raise_fd_limit(2 * devices + 256)
    base, shards = prepare_world(data_dir, root / "world", 1)
    with contextlib.ExitStack() as stack:
        broker = MosquittoBroker(root / "broker", extra_config=broker_config())
        broker.start()
        stack.callback(broker.stop)
        options = ["--device-seconds", str(device_seconds), "--epochs", str(EPOCHS),
                   "--lr", str(LR)]  # fmt: skip
        fleet = SimulatedFleet(broker.url, base, shards, devices, 1, root / "loadgen",
                               options=options)  # fmt: skip
        stack.callback(fleet.stop)
        fleet.start()
        reference = run_reference(base, shards[0], epochs=1, lr=LR)  # the adapter's shapes
        coordinator = Coordinator(broker.url, load_base_model(base).weights_hash)
        stack.callback(coordinator.close)
        yield fleet, coordinator, RoundPlan(fleet.device_ids, reference.arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--devices", type=int, default=250, help="in the one generator process (bench: 250)")
    add("--rounds", type=int, default=4, help="rounds a measurement")
    add("--repeat", type=int, default=3, help="measurements; the best counts")
    add("--idle-seconds", type=float, default=IDLE_WINDOW_S, help="of the idle measurement")
    add("--device-seconds", type=float, default=DEVICE_SECONDS)
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
    with contextlib.ExitStack() as stack:
        root = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        setup = generator(root, args.devices, args.data_dir, args.device_seconds)
        fleet, coordinator, plan = stack.enter_context(setup)
        play_round(coordinator, plan, 1)  # a warm-up: first-use costs out of the figure
        figures = measure(fleet, coordinator, plan, args.rounds, args.repeat, args.idle_seconds)
    print("\n".join(figures.lines(args.devices, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
