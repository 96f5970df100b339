"""The coordinator driver's CPU per device message, in process: no broker, no Ray, no fleet.

`python -m skipfleet.bench_driver [--repeat N]` feeds real encoded device messages (the load
generator's kinds: presence, heartbeat, job statuses, a fan-sized report) through a real paho
client's packet handling into the bridge (decode, queue, the worker's batch hand-off to a port
that pickles the batch as RayFleetPort does, acks), and outbound messages (a fine-tune job, a
desired pointer with its adapter inline) through the bridge's publish and the broker's PUBACK.
Figures are CPU time (time.process_time) per message, the best of --repeat runs, so they are
repeatable on a shared machine. Ray's own cost per call (~1 ms whatever the batch) is not in it.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes

from coordinator.bridge import MqttBridge
from coordinator.config import CoordinatorConfig
from coordinator.ingest import Received
from coordinator.metrics import FleetMetrics
from coordinator.observations import MetricsReport
from coordinator.outbound import Outbound
from coordinator.ports import Committing, committed_now
from coordinator.ray_runtime import pack
from shared.mqtt import MqttSettings, _publish_template, make_client
from shared.protocol import (
    AdapterPublication,
    DesiredState,
    FinetuneParams,
    Heartbeat,
    Job,
    JobKind,
    JobState,
    JobStatus,
    Lineage,
    Presence,
    PresenceState,
    Report,
    ReportMetrics,
    encode_for_publish,
    kind_of,
)
from shared.protocol.routing import topic_kind_for
from shared.topics import Topics

BASE_HASH = "sha256:" + "ab" * 32
FAN_DIMS, FAN_CLASSES, RANK = (256, 96, 96), 3, 4
DEVICES = 200


def fan_adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays = {}
    for k, d in enumerate(FAN_DIMS, start=1):
        arrays[f"A{k}"] = rng.standard_normal((d, RANK)).astype(np.float32) * 0.1
        arrays[f"B{k}"] = rng.standard_normal((RANK, FAN_CLASSES)).astype(np.float32) * 0.1
        arrays[f"delta{k}"] = rng.standard_normal((d, FAN_CLASSES)).astype(np.float32) * 0.01
    return arrays


def device_messages(rng: np.random.Generator) -> dict[str, object]:
    """One message of each kind a simulated device sends in a round, as the load generator."""
    job_id = "job-0123456789abcdef"
    metrics = ReportMetrics(
        0.61, 0.74, 410, 30, 2.5, 11.0, "model:rpi4", 0.9, BASE_HASH, "skip2-lora", RANK
    )
    return {
        "presence": Presence(
            PresenceState.ONLINE,
            "boot-1",
            "0.1.0",
            BASE_HASH,
            "fan",
            {"hostname": "sim", "cpus": 4, "simulated": True},
        ),
        "heartbeat": Heartbeat(
            1.2, "model:rpi4", 300.0, 1000, 0, 0, 12.0, None, 0.1, 3, None, False
        ),
        "in_progress": JobStatus(job_id, JobState.IN_PROGRESS, progress=0.5),
        "succeeded": JobStatus(
            job_id,
            JobState.SUCCEEDED,
            progress=1.0,
            detail={"accuracy_before": 0.6, "installed": True},
        ),
        "report": Report(job_id, fan_adapter(rng), metrics, parent_adapter_version=3),
        # what the load generator's devices send: a skip2-lora adapter, its factors alone
        "report (A, B only)": Report(
            job_id, lora_adapter(fan_adapter(rng)), metrics, parent_adapter_version=3
        ),
    }


def lora_adapter(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A skip2-lora adapter's arrays (A_k and B_k): `arrays` without the ΔW_k ("delta")."""
    return {name: a for name, a in arrays.items() if not name.startswith("delta")}


def publish_packet(topic: str, payload: bytes, mid: int, properties: bytes) -> tuple[int, bytes]:
    """A QoS 1 PUBLISH as paho reads it off the socket: (command byte, the rest)."""
    encoded = topic.encode()
    body = struct.pack("!H", len(encoded)) + encoded + struct.pack("!H", mid)
    return 0x32, body + properties + payload


def device_properties(kind: str) -> bytes:
    """The properties the agent sends with every publish (shared.mqtt.publish_properties)."""
    return bytes(_publish_template(kind).pack())


class PicklingPort:
    """RayFleetPort's driver side without Ray: the batch pickled, nothing else."""

    def __init__(self) -> None:
        self.messages = 0

    def ingest(self, batch: Sequence[Received]) -> None:
        pack(list(batch))
        self.messages += len(batch)

    def submit_ingest(self, batch: Sequence[Received]) -> Committing:
        return committed_now(self.ingest, batch)

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        return []

    def reask_open_jobs(self) -> int:
        return 0

    def metrics_report(self) -> MetricsReport:
        raise NotImplementedError


def make_bridge(state_dir: Path, lean: bool) -> tuple[MqttBridge, paho.Client, PicklingPort]:
    config = CoordinatorConfig(mqtt=MqttSettings("localhost"), state_dir=state_dir)
    port = PicklingPort()
    clients: list[paho.Client] = []

    def factory(settings, client_id, manual_ack=False):
        client = make_client(settings, client_id, manual_ack=manual_ack, lean=lean)
        clients.append(client)
        return client

    bridge = MqttBridge(config, port, FleetMetrics(), client_factory=factory)
    return bridge, clients[0], port


def cpu_us(run: Callable[[], int], repeat: int) -> float:
    """Best CPU microseconds per item of `run` (which returns how many items it did)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        items = run()
        best = min(best, (time.process_time() - started) / items * 1e6)
    return best


def inbound(
    bridge: MqttBridge, client: paho.Client, kind: str, message: object
) -> Callable[[], int]:
    """paho reads DEVICES publishes of this kind; the bridge queues, batches, hands off, acks."""
    topics = Topics()
    packets = []
    for index in range(DEVICES):
        device = f"dev-{index:04d}"
        topic = topics.topic(device, topic_kind_for(kind_of(message)))
        (item,) = encode_for_publish(message, sender=device, boot_id="boot-1", seq=index + 1)
        props = device_properties(kind_of(message).value)
        packets.append(publish_packet(topic, item.payload, index + 1, props))

    def run() -> int:
        for command, body in packets:
            client._in_packet = {
                "command": command,
                "packet": body,
                "remaining_length": len(body),
            }
            client._packet_handle()
        while True:
            items = bridge._inbox.take(256)
            if not items:
                break
            bridge._dequeued(items)
            bridge._settle(bridge._submit(items))  # the inbound and settling threads' steps
        client._out_packet.clear()  # the PUBACKs, unsent
        return len(packets)

    return run


def outbound(
    bridge: MqttBridge, client: paho.Client, messages: list[Outbound]
) -> Callable[[], int]:
    """The bridge publishes each message (paho queues it), then the broker's PUBACK arrives."""

    def run() -> int:
        mids = []
        for outbound in messages:
            bridge.publish(outbound)
        mids = list(client._out_messages)
        for mid in mids:
            client._in_packet = {
                "command": PacketTypes.PUBACK << 4,
                "packet": struct.pack("!H", mid),
                "remaining_length": 2,
            }
            client._packet_handle()
        bridge._published.settled()
        client._out_packet.clear()
        return len(mids)

    return run


def outbound_messages(rng: np.random.Generator) -> dict[str, list[Outbound]]:
    finetune = FinetuneParams(epochs=30, lr=0.02, seed=7)
    publication = AdapterPublication(
        4,
        BASE_HASH,
        "fan",
        fan_adapter(rng),
        Lineage("round-1", ("dev-0001",), "exact-delta", 3),
        time.time(),
    )
    pointer = DesiredState(4, BASE_HASH, "fan", adapter=publication)
    jobs = [
        Outbound(
            f"dev-{i:04d}",
            Job(f"job-{i:016x}", JobKind.FINETUNE, finetune, time.time() + 600, BASE_HASH),
            seq=i + 1,
        )
        for i in range(DEVICES)
    ]
    pointers = [Outbound(f"dev-{i:04d}", pointer, seq=10_000 + i) for i in range(DEVICES)]
    return {"job": jobs, "desired (adapter inline)": pointers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the best counts")
    parser.add_argument(
        "--plain-paho",
        action="store_true",
        help="paho's own Client, not the bridge's LeanClient (to compare)",
    )
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        bridge, client, _ = make_bridge(Path(tmp), lean=not args.plain_paho)
        client._sock = None
        figures = {}
        for kind, message in device_messages(rng).items():
            figures[f"in  {kind}"] = cpu_us(inbound(bridge, client, kind, message), args.repeat)
        for kind, messages in outbound_messages(rng).items():
            figures[f"out {kind}"] = cpu_us(outbound(bridge, client, messages), args.repeat)
    for name, us in figures.items():
        print(f"{name:28s} {us:8.1f} µs CPU / message")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
