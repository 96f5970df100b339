"""Delivery the coordinator can state exactly: a durable outbox, de-duplication in the fleet
state, transactions per batch and per tick, acknowledgements only after the commit, and /health
naming stuck work. No Ray and no broker: the service in-process and a fake paho client."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.api import ApiError, FleetApi
from coordinator.bridge import MqttBridge
from coordinator.clock import ManualClock
from coordinator.delivery import InboundAcks, PublishTracker
from coordinator.metrics import FleetMetrics
from coordinator.ports import LocalFleetPort, NotCommitted, Unavailable
from coordinator.service import FleetService
from coordinator.state_db import StateDB
from coordinator.stuck import STUCK_GRACE_S
from shared.protocol import JobKind, encode_envelope
from tests.coord_fleet_helpers import SimDevice, jobs_in, make_config
from tests.test_coord_bridge import RESUMED, FakeClient, wait_for


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def joined(service: FleetService, clock: ManualClock, *names: str) -> dict[str, SimDevice]:
    devices = {name: SimDevice(name, clock) for name in names}
    service.ingest([m for d in devices.values() for m in (d.presence(), d.heartbeat())])
    return devices


# ---- the durable outbox


def test_unacknowledged_messages_are_handed_out_again_by_a_restarted_service(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    joined(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    first = service.tick()
    assert len(jobs_in(first, JobKind.FINETUNE)) == 2
    assert service.tick() == []  # handed out once per life, not on every tick
    acked = next(o for o in first if o.device_id == "pi-1")
    service.tick([acked.seq])  # the broker acknowledged pi-1's job only
    service.close()
    again = FleetService(make_config(tmp_path), clock=clock)
    resent = again.tick()
    assert [(o.device_id, o.message_id) for o in resent] == [
        (o.device_id, o.message_id) for o in first if o.device_id == "pi-2"
    ]  # the same message (same id: the device drops a repeat), and only the unacknowledged one
    # read back from its row, it is what the first life handed out from memory
    assert [o.message for o in resent] == [o.message for o in first if o.device_id == "pi-2"]


def test_a_job_that_expired_in_the_outbox_is_dropped_not_sent(tmp_path, clock):
    service = FleetService(make_config(tmp_path, job_timeout_s=60.0), clock=clock)
    joined(service, clock, "pi-1")
    service.request_finetune(devices=["pi-1"])
    ((_, old),) = jobs_in(service.tick(), JobKind.FINETUNE)
    service.close()
    clock.advance(61.0)
    again = FleetService(make_config(tmp_path, job_timeout_s=60.0), clock=clock)
    handed = again.tick()
    assert old.job_id not in {job.job_id for _, job in jobs_in(handed)}
    assert all(not job.is_expired(clock()) for _, job in jobs_in(handed))


def test_a_failed_tick_leaves_neither_its_jobs_nor_their_messages(tmp_path, clock, monkeypatch):
    service = FleetService(make_config(tmp_path), clock=clock)
    joined(service, clock, "pi-1")
    service.request_finetune(devices=["pi-1"])
    distributor = service._distributor
    monkeypatch.setattr(distributor, "check_deadlines", lambda: 1 / 0)  # after the dispatch
    with pytest.raises(ZeroDivisionError):
        service.tick()
    assert service.jobs() == [] and service.health()["outbox_backlog"] == 0
    assert service.fleet.outbox._added == {}  # nor its messages' in-memory copies
    monkeypatch.undo()
    (job,) = jobs_in(service.tick(), JobKind.FINETUNE)  # the request is still queued
    assert [j["job_id"] for j in service.jobs()] == [job[1].job_id]


def test_a_rollout_to_many_devices_reads_its_adapter_once_per_hand_out(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = joined(service, clock, "pi-1", "pi-2", "pi-3")
    service.request_finetune(all_=True)
    for device, job in jobs_in(service.tick(), JobKind.FINETUNE):
        service.ingest(devices[device].finetune(job.job_id))
    reads = []
    store = service.fleet.store
    original = store.get
    store.get = lambda *args, **kwargs: reads.append(args) or original(*args, **kwargs)
    canary = service.tick()  # candidate adapter + two evaluations per canary
    adapters = [o for o in canary if type(o.message).__name__ == "AdapterPublication"]
    assert len(adapters) == 3 and len(reads) == 1


def test_an_adapter_file_gone_from_disk_costs_its_rows_only_not_the_hand_out(tmp_path, clock):
    """An adapter whose file cannot be read is 'gone' (like one whose content does not match
    its sha256): its rows are dropped with a warning, and the other devices' messages of the
    same hand-out still go out. A raise would have marked the whole hand-out as handed out."""
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = joined(service, clock, "pi-1", "pi-2", "pi-3")
    service.request_finetune(all_=True)
    for device, job in jobs_in(service.tick(), JobKind.FINETUNE):
        service.ingest(devices[device].finetune(job.job_id))
    canary = service.tick()  # the candidate adapter and an evaluation per canary
    evaluations = {o.message_id for o in canary if type(o.message).__name__ == "Job"}
    assert evaluations
    service.close()
    for stored in (tmp_path / "adapters").rglob("*.npz"):
        stored.unlink()  # e.g. an operator's clean-up
    again = FleetService(make_config(tmp_path), clock=clock)
    resent = again.tick()  # a new life hands out every unacknowledged row again
    assert evaluations <= {o.message_id for o in resent}
    assert not [o for o in resent if type(o.message).__name__ == "AdapterPublication"]


# ---- de-duplication in the fleet state


def test_a_report_delivered_again_after_a_restart_is_applied_once(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = joined(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    (device, job), *_ = jobs_in(service.tick(), JobKind.FINETUNE)
    answer = devices[device].finetune(job.job_id)
    assert service.ingest(answer) == len(answer)
    assert service.ingest(answer) == 0  # the same envelopes (boot id, seq) again
    service.close()
    again = FleetService(make_config(tmp_path), clock=clock)
    assert again.ingest(answer) == 0  # remembered in SQLite, not only in memory
    (record,) = [j for j in again.jobs() if j["job_id"] == job.job_id]
    assert record["state"] == "SUCCEEDED"


def test_a_repeated_heartbeat_is_dropped_in_memory(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    beat = SimDevice("pi-1", clock).heartbeat()
    assert service.ingest([beat, beat]) == 1


def test_a_message_that_fails_rolls_back_its_own_writes_only(tmp_path, clock, monkeypatch):
    service = FleetService(make_config(tmp_path), clock=clock)
    registry = service.fleet.registry
    original = registry.set_presence

    def fails_for_bad(device, *args, **kwargs):
        if device == "pi-bad":
            raise RuntimeError("a bug, after register() wrote the device")
        return original(device, *args, **kwargs)

    monkeypatch.setattr(registry, "set_presence", fails_for_bad)
    good, bad = SimDevice("pi-good", clock), SimDevice("pi-bad", clock)
    assert service.ingest([bad.presence(), good.presence()]) == 1
    assert [d["device_id"] for d in service.devices()] == ["pi-good"]


# ---- the state DB


def test_a_reader_thread_sees_committed_state_and_is_not_blocked_by_an_open_transaction(
    tmp_path,
):
    db = StateDB(tmp_path / "state.sqlite3")
    db.ensure_schema("CREATE TABLE t (v INTEGER);")
    db.execute("INSERT INTO t VALUES (1)")
    seen, took = [], []

    def read():
        start = time.monotonic()
        seen.append([r["v"] for r in db.query("SELECT v FROM t ORDER BY v")])
        took.append(time.monotonic() - start)

    with db.transaction():
        db.execute("INSERT INTO t VALUES (2)")
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=4.0)  # under the 5 s busy timeout: it must not have waited for us
        assert not reader.is_alive() and seen == [[1]]
    read()
    assert seen[-1] == [1, 2]
    db.close()


def test_a_nested_transaction_that_raises_rolls_back_only_itself(tmp_path):
    db = StateDB(tmp_path / "state.sqlite3")
    db.ensure_schema("CREATE TABLE t (v INTEGER);")
    with db.transaction():
        db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ValueError), db.transaction():
            db.execute("INSERT INTO t VALUES (2)")
            raise ValueError("inner")
        db.execute("INSERT INTO t VALUES (3)")
    assert [r["v"] for r in db.query("SELECT v FROM t ORDER BY v")] == [1, 3]
    db.close()


# ---- the bridge's acknowledgements


def test_an_outbox_row_is_settled_only_when_every_chunk_was_acknowledged():
    tracker = PublishTracker()
    tracker.published(1, [10, 11, 12])
    tracker.on_puback(20)  # row 2's PUBACK, before published() recorded its mid
    tracker.on_puback(10)
    tracker.on_puback(11)
    assert tracker.settled() == [] and tracker.holds(1)
    tracker.published(2, [20])
    tracker.on_puback(12)
    assert sorted(tracker.settled()) == [1, 2] and not tracker.holds(1)


def test_an_acknowledgement_owed_on_an_earlier_connection_is_never_sent():
    sent = []
    acks = InboundAcks(lambda mid, qos: sent.append(mid))
    acks.connected()
    before = acks.token(7, 1)
    acks.connected()  # a reconnect: mid 7 may now name another message
    assert acks.ack([before, acks.token(8, 1), acks.token(9, 0)]) == 1 and sent == [8]


def test_a_batch_of_acknowledgements_goes_out_in_one_call_with_the_same_rules():
    one_by_one, batches = [], []
    acks = InboundAcks(lambda mid, qos: one_by_one.append((mid, qos)), batches.append)
    acks.connected()
    before = acks.token(7, 1)
    acks.connected()
    tokens = [before, acks.token(8, 1), acks.token(9, 0), acks.token(10, 1), acks.token(11, 2)]
    assert acks.ack(tokens) == 3
    assert batches == [[8, 10]]  # this connection's QoS 1 messages, in order
    assert one_by_one == [(11, 2)]  # QoS 2 still through paho's own ack


class GatedPort(LocalFleetPort):
    """ingest waits for the test's go, or fails as unavailable while `down` is set."""

    def __init__(self, service):
        super().__init__(service)
        self.go = threading.Event()
        self.down = threading.Event()

    def ingest(self, batch):
        self.go.wait(10)
        if self.down.is_set():
            raise Unavailable("the actor is restarting")
        super().ingest(batch)


@pytest.fixture
def gated_bridge(tmp_path):
    clock = ManualClock()
    config = dataclasses.replace(make_config(tmp_path), tick_interval_s=0.02)
    service = FleetService(config, clock=clock)
    port = GatedPort(service)
    clients = []

    def factory(settings, client_id, manual_ack=False):
        clients.append(FakeClient(settings, client_id, manual_ack))
        return clients[-1]

    bridge = MqttBridge(config, port, FleetMetrics(), client_factory=factory)
    bridge.start()
    (client,) = clients
    assert client.manual_ack
    client.on_connect(client, None, RESUMED, ReasonCode(PacketTypes.CONNACK, identifier=0), None)
    yield client, port, service, clock
    port.go.set()
    bridge.stop()
    service.close()


def test_a_device_message_is_acknowledged_only_after_the_fleet_state_committed_it(gated_bridge):
    client, port, service, clock = gated_bridge
    port.down.set()
    client.deliver("fleet/pi-1/status", encode_envelope(SimDevice("pi-1", clock).presence()
                                                        .envelope), mid=7)  # fmt: skip
    port.go.set()  # the fleet state is unavailable: retried, not acknowledged
    time.sleep(0.3)
    assert client.acked == [] and service.devices() == []
    port.down.clear()
    wait_for(lambda: client.acked == [7])
    assert [d["device_id"] for d in service.devices()] == ["pi-1"]


def test_the_broker_acknowledgement_of_a_publish_deletes_its_outbox_row(gated_bridge):
    client, port, service, clock = gated_bridge
    port.go.set()
    for message in (SimDevice("pi-1", clock).presence(), SimDevice("pi-1", clock).heartbeat()):
        client.deliver("fleet/pi-1/status", encode_envelope(message.envelope), mid=1)
    wait_for(lambda: service.devices())
    service.request_finetune(devices=["pi-1"])
    wait_for(lambda: client.mids)  # the job was published
    assert service.health()["outbox_backlog"] == 1
    client.puback_all()
    wait_for(lambda: service.health()["outbox_backlog"] == 0)


class HeldPort(LocalFleetPort):
    """submit_ingest returns at once, as the actor's does; a batch is committed only when the
    test releases it, and the next `failures` releases fail as unavailable instead."""

    def __init__(self, service):
        super().__init__(service)
        self.submitted: list[list[str]] = []  # each submission's devices
        self.released = threading.Semaphore(0)
        self.failures = 0

    def submit_ingest(self, batch):
        self.submitted.append([r.device_id for r in batch])
        return HeldBatch(self, batch)


class HeldBatch:
    def __init__(self, port: HeldPort, batch):
        self.port, self.batch = port, batch

    def wait(self):
        assert self.port.released.acquire(timeout=10), "the test never released this batch"
        if self.port.failures:
            self.port.failures -= 1
            raise Unavailable("the actor is restarting")
        self.port.ingest(self.batch)


def connected_bridge(service: FleetService, port) -> tuple[MqttBridge, FakeClient]:
    """A started bridge on `port`, its fake client connected with the session resumed."""
    clients = []

    def factory(settings, client_id, manual_ack=False):
        clients.append(FakeClient(settings, client_id, manual_ack))
        return clients[-1]

    bridge = MqttBridge(service.config, port, FleetMetrics(), client_factory=factory)
    bridge.start()
    (client,) = clients
    client.on_connect(client, None, RESUMED, ReasonCode(PacketTypes.CONNACK, identifier=0), None)
    return bridge, client


@pytest.fixture
def held_bridge(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    port = HeldPort(service)
    bridge, client = connected_bridge(service, port)
    yield client, port, service
    port.released.release(100)
    bridge.stop()
    service.close()


def deliver_presence(client, clock, device: str, mid: int) -> None:
    presence = SimDevice(device, clock).presence().envelope
    client.deliver(f"fleet/{device}/status", encode_envelope(presence), mid=mid)


def test_a_second_batch_goes_to_the_fleet_state_before_the_first_is_committed_and_no_third(
    held_bridge, clock
):
    client, port, service = held_bridge
    deliver_presence(client, clock, "pi-1", mid=1)
    wait_for(lambda: len(port.submitted) == 1)
    deliver_presence(client, clock, "pi-2", mid=2)
    wait_for(lambda: len(port.submitted) == 2)  # while the first is not committed
    deliver_presence(client, clock, "pi-3", mid=3)
    time.sleep(0.2)
    assert port.submitted == [["pi-1"], ["pi-2"]]  # two on their way at most
    assert client.acked == [] and service.devices() == []
    port.released.release()
    wait_for(lambda: client.acked == [1])  # the first committed: acknowledged, the third sent
    wait_for(lambda: len(port.submitted) == 3)
    assert [d["device_id"] for d in service.devices()] == ["pi-1"]
    port.released.release(2)
    wait_for(lambda: client.acked == [1, 2, 3])
    assert [d["device_id"] for d in service.devices()] == ["pi-1", "pi-2", "pi-3"]


def test_a_batch_that_fails_is_submitted_again_and_the_one_behind_it_waits_for_its_ack(
    held_bridge, clock
):
    client, port, service = held_bridge
    port.failures = 1
    deliver_presence(client, clock, "pi-1", mid=1)
    wait_for(lambda: len(port.submitted) == 1)
    deliver_presence(client, clock, "pi-2", mid=2)
    wait_for(lambda: len(port.submitted) == 2)
    port.released.release()  # the first fails: submitted again, nothing acknowledged
    wait_for(lambda: len(port.submitted) == 3)
    assert port.submitted[2] == ["pi-1"] and client.acked == []
    port.released.release(2)
    wait_for(lambda: client.acked == [1, 2])  # in order, each after its commit
    assert [d["device_id"] for d in service.devices()] == ["pi-1", "pi-2"]


class RefusingPort(LocalFleetPort):
    """The first hand-over fails at once (NotCommitted, as a synchronous port's does), the
    second raises a bug's error on its wait; then batches commit."""

    def __init__(self, service):
        super().__init__(service)
        self.submitted: list[list[str]] = []

    def submit_ingest(self, batch):
        self.submitted.append([r.device_id for r in batch])
        if len(self.submitted) == 1:
            return NotCommitted(Unavailable("partition 1 is not running yet"))
        if len(self.submitted) == 2:
            return Broken()
        return super().submit_ingest(batch)


class Broken:
    def wait(self):
        raise RuntimeError("a bug in the fleet state")


def test_a_batch_not_handed_over_holds_the_next_back_and_a_failed_wait_is_retried(
    tmp_path, clock, monkeypatch
):
    monkeypatch.setattr("coordinator.bridge.backoff_delay", lambda *a, **k: 0.01)
    service = FleetService(make_config(tmp_path), clock=clock)
    port = RefusingPort(service)
    bridge, client = connected_bridge(service, port)
    try:
        deliver_presence(client, clock, "pi-1", mid=1)
        wait_for(lambda: len(port.submitted) >= 1)
        deliver_presence(client, clock, "pi-2", mid=2)
        wait_for(lambda: client.acked == [1, 2])
        # pi-1 refused, then broken, then committed, and only then pi-2 went: never overtaken
        assert port.submitted == [["pi-1"], ["pi-1"], ["pi-1"], ["pi-2"]]
        assert [d["device_id"] for d in service.devices()] == ["pi-1", "pi-2"]
    finally:
        bridge.stop()
        service.close()


# ---- /health


def test_health_names_a_round_left_open_past_its_deadline_and_the_api_answers_503(
    tmp_path, clock, monkeypatch
):
    service = FleetService(make_config(tmp_path, round_deadline_s=120.0), clock=clock)
    joined(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    service.tick()
    api = FleetApi(LocalFleetPort(service), bridge_connected=lambda: True)
    assert service.health()["stuck"] == []
    monkeypatch.setattr(service.fleet.scheduler, "tick", lambda: 1 / 0)  # a wedged part
    clock.advance(120.0 + STUCK_GRACE_S + 1)
    (stuck,) = service.health()["stuck"]
    assert stuck["kind"] == "round" and stuck["stage"] == "RUNNING"
    with pytest.raises(ApiError) as refused:
        api._health({})
    assert refused.value.status == 503 and stuck["id"] in str(refused.value)


def test_a_device_clock_offset_from_its_heartbeat_is_in_its_view_and_a_metric(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    device = SimDevice("pi-1", clock)
    beat = dataclasses.replace(device.heartbeat().envelope.message, clock_offset_s=3600.5)
    assert service.ingest([device.presence(), device.received(beat)]) == 2
    assert service.device("pi-1")["clock_offset_s"] == 3600.5
    metrics = FleetMetrics()
    metrics.apply(service.metrics_report())
    offset = metrics.registry.get_sample_value(
        "skipfleet_device_clock_offset_seconds", {"device": "pi-1"}
    )
    assert offset == 3600.5


def test_health_counts_the_devices_and_those_online(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in ("pi-3", "pi-1", "pi-2")]
    service.ingest([d.presence() for d in devices] + [devices[0].presence(online=False)])
    health = service.health()
    assert (health["devices"], health["online"]) == (3, 2)
