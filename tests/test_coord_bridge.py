"""The MQTT bridge without a broker or Ray: a fake paho client, and the fleet state in-process."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from paho.mqtt.client import ConnectFlags
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from coordinator import bridge as bridge_module
from coordinator.bridge import FatalReason, InboundDecoder, MqttBridge
from coordinator.clock import ManualClock
from coordinator.metrics import FleetMetrics
from coordinator.outbound import Outbound, desired
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.protocol import (
    AdapterPublication,
    DesiredState,
    Job,
    JobKind,
    Lineage,
    Reassembler,
    decode,
    encode_envelope,
    encode_for_publish,
)
from shared.topics import Topics
from tests.coord_fleet_helpers import BASE_HASH, SimDevice, make_config


def rejected(metrics: FleetMetrics, reason: str) -> float:
    return (
        metrics.registry.get_sample_value("skipfleet_rejected_messages_total", {"reason": reason})
        or 0.0
    )


def payload_of(received) -> bytes:
    return encode_envelope(received.envelope)


@pytest.fixture
def decoder_and_metrics():
    metrics = FleetMetrics()
    return InboundDecoder(Topics(), metrics, publish_limit=8192), metrics


def test_a_device_message_is_decoded_and_counted(decoder_and_metrics):
    decoder, metrics = decoder_and_metrics
    device = SimDevice("pi-1", ManualClock())
    message = device.heartbeat()
    received = decoder.decode("fleet/pi-1/telemetry", payload_of(message))
    assert received.device_id == "pi-1" and received.envelope.seq == message.envelope.seq
    sample = metrics.registry.get_sample_value
    assert sample("skipfleet_received_messages_total", {"kind": "telemetry"}) == 1.0
    assert sample("skipfleet_received_bytes_total", {"kind": "telemetry"}) > 0


def test_garbage_impostors_and_strangers_are_dropped(decoder_and_metrics):
    decoder, metrics = decoder_and_metrics
    device = SimDevice("pi-1", ManualClock())
    beat = payload_of(device.heartbeat())
    assert decoder.decode("fleet/pi-1/telemetry", beat) is not None
    assert decoder.decode("fleet/pi-1/telemetry", b"\x93garbage") is None
    assert decoder.decode("fleet/pi-2/telemetry", payload_of(device.heartbeat())) is None
    assert decoder.decode("other/pi-1/telemetry", beat) is None
    assert decoder.decode("fleet/pi-1/cmd/job", beat) is None
    assert decoder.decode("fleet/pi-1/telemetry", b"x" * 9000) is None
    for reason in ("malformed", "wrong_route", "bad_topic", "oversized"):
        assert rejected(metrics, reason) >= 1.0, reason


def test_a_chunked_report_is_reassembled_once(decoder_and_metrics):
    decoder, _metrics = decoder_and_metrics
    device = SimDevice("pi-1", ManualClock())
    big = {"A1": np.ones((800, 4), np.float32), "B1": np.ones((4, 3), np.float32)}
    report = device.report("job-1", arrays=big).envelope
    items = encode_for_publish(
        report.message, sender="pi-1", limit=4096, boot_id=report.boot_id, seq=report.seq
    )
    assert len(items) > 1
    results = [decoder.decode("fleet/pi-1/report", item.payload) for item in items]
    assert results[:-1] == [None] * (len(items) - 1)
    assert results[-1].envelope.message.adapter["A1"].shape == (800, 4)
    assert decoder.decode("fleet/pi-1/report", items[-1].payload) is None  # a late duplicate


class FakeClient:
    """Stands in for paho: records publishes and subscriptions; tests call the callbacks."""

    def __init__(self, settings, client_id, manual_ack=False):
        self.client_id = client_id
        self.manual_ack = manual_ack
        self.published: list[tuple[str, bytes, int, bool, object]] = []
        self.mids: list[int] = []
        self.acked: list[int] = []
        self.subscribed: list = []
        self.lock = threading.Lock()

    def connect_async(self, *args, **kwargs):
        pass

    def loop_start(self):
        pass

    def loop_stop(self):
        pass

    def disconnect(self):
        pass

    def subscribe(self, topics):
        self.subscribed.append(topics)

    def publish(self, topic, payload, qos=0, retain=False, properties=None):
        with self.lock:
            self.published.append((topic, payload, qos, retain, properties))
            self.mids.append(len(self.mids) + 1)
            return type("Info", (), {"rc": 0, "mid": self.mids[-1]})()

    def ack(self, mid, qos):
        with self.lock:
            self.acked.append(mid)

    def puback_all(self):
        """The broker acknowledges every publish so far."""
        with self.lock:
            mids = list(self.mids)
        for mid in mids:
            self.on_publish(self, None, mid, ReasonCode(PacketTypes.PUBACK, identifier=0), None)

    def deliver(self, topic: str, payload: bytes, mid: int = 1, qos: int = 1) -> None:
        message = type("Message", (), {"topic": topic, "payload": payload, "mid": mid,
                                        "qos": qos})()  # fmt: skip
        self.on_message(self, None, message)


def wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return value


@pytest.fixture
def bridge_parts(tmp_path):
    clock = ManualClock()
    config = dataclasses.replace(make_config(tmp_path), tick_interval_s=0.02, chunk_limit=4096)
    service = FleetService(config, clock=clock)
    metrics = FleetMetrics()
    fatal: list[tuple[FatalReason, str]] = []
    clients: list[FakeClient] = []

    def factory(settings, client_id, manual_ack=False):
        clients.append(FakeClient(settings, client_id, manual_ack))
        return clients[-1]

    bridge = MqttBridge(
        config,
        LocalFleetPort(service),
        metrics,
        on_fatal=lambda *why: fatal.append(why),
        client_factory=factory,
    )
    bridge.start()
    yield bridge, clients[0], service, metrics, fatal, clock
    bridge.stop()
    service.close()


# A CONNACK resuming the session: nothing to ask again (tests/test_coord_reask.py: without one).
RESUMED = ConnectFlags(session_present=True)


def connack(value: int) -> ReasonCode:
    return ReasonCode(PacketTypes.CONNACK, identifier=value)


def test_the_bridge_subscribes_on_connect_and_stops_on_refused_credentials(bridge_parts):
    bridge, client, _, _, fatal, _ = bridge_parts
    client.on_connect(client, None, RESUMED, connack(0), None)
    assert bridge.connected
    (subscriptions,) = client.subscribed
    assert ("fleet/+/report", 1) in subscriptions and ("fleet/+/telemetry", 0) in subscriptions
    client.on_connect(client, None, RESUMED, connack(0x86), None)
    assert fatal and fatal[0][0] is FatalReason.BROKER_REFUSED
    assert "Bad user name or password" in fatal[0][1]


def test_device_messages_reach_the_fleet_and_jobs_come_back(bridge_parts):
    _bridge, client, service, metrics, _, clock = bridge_parts
    device = SimDevice("pi-1", clock)
    for message in (device.presence(), device.heartbeat()):
        client.deliver(
            f"fleet/pi-1/{'status' if message.envelope.seq == 1 else 'telemetry'}",
            payload_of(message),
        )
    wait_for(lambda: service.devices() and service.devices()[0]["online"])
    service.request_finetune(devices=["pi-1"])

    def job_sent():
        with client.lock:
            return [p for p in client.published if p[0] == "fleet/pi-1/cmd/job"]

    ((_topic, payload, qos, retain, properties),) = wait_for(job_sent)
    job = decode(payload).message
    assert isinstance(job, Job) and job.kind is JobKind.FINETUNE
    assert (qos, retain) == (1, False)
    on_the_wire = Properties(PacketTypes.PUBLISH)
    on_the_wire.unpack(properties.pack())
    assert 0 < on_the_wire.MessageExpiryInterval <= service.config.policy.job_timeout_s + 1
    assert job.base_model_hash == BASE_HASH and job.params.epochs == service.config.finetune.epochs
    assert metrics.registry.get_sample_value("skipfleet_sent_messages_total", {"kind": "job"})


def test_adapters_are_chunked_under_the_limit_and_the_desired_pointer_is_retained(bridge_parts):
    bridge, client, _, _, _, _ = bridge_parts
    arrays = {"delta1": np.random.default_rng(0).normal(size=(2000, 3)).astype(np.float32)}
    publication = AdapterPublication(
        1, BASE_HASH, "fan-bbbb", arrays, Lineage("r1", ("pi-1",), "exact-delta"), 1.0
    )
    bridge.publish(Outbound("pi-1", publication))
    bridge.publish(Outbound("pi-1", desired(1, BASE_HASH, "fan-bbbb")))
    with client.lock:
        chunks = [p for p in client.published if p[0] == "fleet/pi-1/cmd/adapter"]
        pointer = [p for p in client.published if p[0] == "fleet/pi-1/cmd/desired"]
    assert len(chunks) > 1 and all(len(p[1]) <= 4096 and p[2] == 1 for p in chunks)
    reassembler = Reassembler()
    whole = [reassembler.feed(decode(p[1])) for p in chunks][-1]
    np.testing.assert_array_equal(whole.message.arrays["delta1"], arrays["delta1"])
    ((_, payload, qos, retain, _),) = pointer
    assert (qos, retain) == (1, True) and isinstance(decode(payload).message, DesiredState)


def test_stop_commits_the_last_received_messages(tmp_path):
    service = FleetService(make_config(tmp_path), clock=ManualClock())
    port = LocalFleetPort(service)
    bridge = MqttBridge(service.config, port, FleetMetrics(), client_factory=FakeClient)
    device = SimDevice("pi-9", ManualClock())
    bridge._client.deliver("fleet/pi-9/status", payload_of(device.presence()))  # not started
    bridge.stop()
    assert [d["device_id"] for d in service.devices()] == ["pi-9"]


def test_a_full_queue_keeps_each_devices_latest_heartbeat_and_every_qos_1_message(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(bridge_module, "QUEUE_CAPACITY", 2)
    service = FleetService(make_config(tmp_path), clock=ManualClock())
    metrics = FleetMetrics()
    bridge = MqttBridge(service.config, LocalFleetPort(service), metrics, client_factory=FakeClient)
    devices = [SimDevice(f"pi-{n}", ManualClock()) for n in range(4)]
    for mid, d in enumerate(devices, start=10):  # presences (QoS 1) past the capacity
        bridge._client.deliver(f"fleet/{d.device_id}/status", payload_of(d.presence()), mid=mid)
    pi3 = devices[3]
    for version in (1, 2):  # the queue is full (not started: nothing drains it)
        beat = pi3.heartbeat(adapter_version=version)
        bridge._client.deliver("fleet/pi-3/telemetry", payload_of(beat), qos=0)
    assert rejected(metrics, "overload") == 1  # pi-3's first heartbeat, replaced by its second
    bridge.stop()
    assert [d["device_id"] for d in service.devices()] == ["pi-0", "pi-1", "pi-2", "pi-3"]
    assert service.device("pi-3")["adapter_version"] == 2  # the latest heartbeat was applied


def test_one_device_flooding_heartbeats_queues_a_few_and_its_latest_is_applied(tmp_path):
    service = FleetService(make_config(tmp_path), clock=ManualClock())
    metrics = FleetMetrics()
    bridge = MqttBridge(service.config, LocalFleetPort(service), metrics, client_factory=FakeClient)
    flooder, other = SimDevice("pi-0", ManualClock()), SimDevice("pi-1", ManualClock())
    for mid, d in enumerate((flooder, other), start=10):
        bridge._client.deliver(f"fleet/{d.device_id}/status", payload_of(d.presence()), mid=mid)
    for version in range(1, 201):  # not started: nothing drains the queue
        beat = payload_of(flooder.heartbeat(adapter_version=version))
        bridge._client.deliver("fleet/pi-0/telemetry", beat, qos=0)
    bridge._client.deliver(
        "fleet/pi-1/telemetry", payload_of(other.heartbeat(adapter_version=7)), qos=0
    )
    queued_flood = len(bridge._inbox) - 2 - 1  # less the presences and pi-1's heartbeat
    assert 1 <= queued_flood <= 8  # a few of pi-0's 200, not all of them
    assert rejected(metrics, "overload") == 200 - queued_flood - 1  # replaced while held
    bridge.stop()
    assert service.device("pi-0")["adapter_version"] == 200  # the newest, held beside the queue
    assert service.device("pi-1")["adapter_version"] == 7


def suback(*values: int) -> list[ReasonCode]:
    return [ReasonCode(PacketTypes.SUBACK, identifier=v) for v in values]


@pytest.mark.parametrize("partitions", [1, 2])
def test_a_refused_shared_subscription_stops_a_partition_but_not_one_coordinator(
    tmp_path, partitions
):
    config = dataclasses.replace(make_config(tmp_path), partitions=partitions, instance="east")
    service = FleetService(config, clock=ManualClock())
    fatal: list = []
    clients: list[FakeClient] = []

    def factory(settings, client_id, manual_ack=False):
        clients.append(FakeClient(settings, client_id, manual_ack))
        return clients[-1]

    bridge = MqttBridge(
        config, LocalFleetPort(service), FleetMetrics(),
        on_fatal=lambda *why: fatal.append(why), client_factory=factory,
    )  # fmt: skip
    (client,) = clients
    client.on_connect(client, None, None, connack(0), None)
    (subscriptions,) = client.subscribed
    shared = [f for f, _ in subscriptions if f.startswith("$share/skipfleet-east/")]
    assert len(shared) == (4 if partitions > 1 else 0)  # every uplink kind but status
    client.on_subscribe(client, None, 1, suback(1, 0, 1, 0x9E, 1), None)
    if partitions > 1:
        ((kind, why),) = fatal
        assert kind is FatalReason.SUBSCRIPTION_REFUSED and "shared subscriptions" in why
    else:
        assert fatal == []  # logged; one coordinator's subscriptions were never fatal
    bridge.stop()
    service.close()


class RecordingPort(LocalFleetPort):
    """LocalFleetPort that records the kinds of each ingest call's batch."""

    def __init__(self, service: FleetService) -> None:
        super().__init__(service)
        self.batches: list[list[str]] = []

    def ingest(self, batch) -> None:
        super().ingest(batch)
        self.batches.append([str(r.envelope.kind) for r in batch])


def started_bridge(tmp_path, monkeypatch, **patched):
    for name, value in patched.items():
        monkeypatch.setattr(bridge_module, name, value)
    service = FleetService(make_config(tmp_path), clock=ManualClock())
    port = RecordingPort(service)
    bridge = MqttBridge(service.config, port, FleetMetrics(), client_factory=FakeClient)
    bridge.start()
    return bridge, port, service


def test_heartbeats_alone_wait_for_more_and_go_to_the_fleet_in_one_call(tmp_path, monkeypatch):
    bridge, port, service = started_bridge(
        tmp_path, monkeypatch, BEATS_LINGER_S=30.0, LINGER_BELOW=3
    )
    try:
        devices = [SimDevice(f"pi-{n}", ManualClock()) for n in range(3)]
        for d in devices:
            service.ingest([d.presence()])
        for n, d in enumerate(devices):
            if n == 1:
                time.sleep(0.3)  # far past LINGER_S: a batch with an event would have gone
            beat = payload_of(d.heartbeat(adapter_version=5))
            bridge._client.deliver(f"fleet/{d.device_id}/telemetry", beat, qos=0)
        wait_for(lambda: port.batches)
        assert port.batches == [["heartbeat"] * 3]  # one call, filled up to LINGER_BELOW
    finally:
        bridge.stop()
        service.close()


def test_an_event_after_a_heartbeat_cuts_the_heartbeats_wait_short(tmp_path, monkeypatch):
    bridge, port, service = started_bridge(tmp_path, monkeypatch, BEATS_LINGER_S=30.0)
    try:
        device = SimDevice("pi-1", ManualClock())
        bridge._client.deliver("fleet/pi-1/telemetry", payload_of(device.heartbeat()), qos=0)
        bridge._client.deliver("fleet/pi-1/status", payload_of(device.presence()), mid=7)
        wait_for(lambda: port.batches, timeout=5.0)  # not BEATS_LINGER_S
        assert port.batches == [["heartbeat", "presence"]]
        assert wait_for(lambda: bridge._client.acked) == [7]
    finally:
        bridge.stop()
        service.close()


def test_a_batch_of_heartbeats_alone_asks_for_no_tick_and_one_with_an_event_does(tmp_path):
    service = FleetService(make_config(tmp_path), clock=ManualClock())
    bridge = MqttBridge(service.config, LocalFleetPort(service), FleetMetrics(),
                        client_factory=FakeClient)  # fmt: skip
    device = SimDevice("pi-1", ManualClock())

    def item(received, mid: int, qos: int):
        topic = "telemetry" if qos == 0 else "status"
        decoded = bridge._decoder.decode(f"fleet/pi-1/{topic}", payload_of(received))
        return decoded, bridge._acks.token(mid, qos)

    bridge._settle(bridge._submit([item(device.presence(), 1, 1)]))
    assert bridge._wake.is_set()
    bridge._wake.clear()
    bridge._settle(bridge._submit([item(device.heartbeat(), 0, 0), item(device.heartbeat(), 0, 0)]))
    assert not bridge._wake.is_set()  # the next tick reads them, whenever it comes
    assert service.device("pi-1")["last_heartbeat_at"] is not None
    bridge.stop()
    service.close()


class SnapshotAsks(LocalFleetPort):
    def __init__(self, service: FleetService) -> None:
        super().__init__(service)
        self.asked: list[bool] = []

    def metrics_report(self, snapshot: bool = True):
        self.asked.append(snapshot)
        return super().metrics_report(snapshot)


@pytest.mark.parametrize("on_scrape", [False, True])
def test_the_bridge_asks_for_snapshots_only_when_the_metrics_do_not_make_them_on_scrape(
    tmp_path, on_scrape
):
    config = dataclasses.replace(make_config(tmp_path), metrics_interval_s=0.05)
    service = FleetService(config, clock=ManualClock())
    port, metrics = SnapshotAsks(service), FleetMetrics()
    if on_scrape:
        metrics.refresh_on_scrape(lambda: port.metrics_report(True), max_age_s=2.0)
    bridge = MqttBridge(config, port, metrics, client_factory=FakeClient)
    bridge.start()
    try:
        wait_for(lambda: len(port.asked) >= 2)
        assert set(port.asked) == {not on_scrape}
    finally:
        bridge.stop()
        service.close()
