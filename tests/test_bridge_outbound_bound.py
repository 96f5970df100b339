"""The bridge hands paho at most OUTBOUND_HELD_MAX publishes beyond those in flight: the rest of a
burst waits in the driver as outbox rows, and PUBACKs ask for the hand-overs that send them, with
or without the fleet state. A real mosquitto, the fleet state in this process (no Ray), a lean
listener counting what arrives; and a fake paho for a restarted actor's second hand-out."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from coordinator import bridge as bridge_module
from coordinator.bridge import MqttBridge, _in_order
from coordinator.metrics import FleetMetrics
from coordinator.outbound import Outbound
from coordinator.ports import LocalFleetPort, Unavailable
from coordinator.service import FleetService
from shared.mqtt import make_client, parse_broker_url
from tests.coord_fleet_helpers import SimDevice, make_config
from tests.test_coord_bridge import FakeClient, wait_for

DEVICES = 120
WINDOW = 5  # publishes in flight: the broker's window, made small so that most of a burst waits
HELD_MAX = 10
# Far longer than a test may wait: a row held back goes out because a PUBACK asked for it.
IDLE_TICK_S = 60.0
WAIT_S = 30.0  # generous for a loaded 2-core machine; passing runs take a second or two


def job_listener(url: str, root: str) -> tuple[object, list[str]]:
    """A client subscribed to every device's job topic; the devices its jobs arrived for."""
    arrived: list[str] = []
    subscribed = threading.Event()
    listener = make_client(parse_broker_url(url), "listener", lean=True)
    listener.on_message = lambda client, userdata, m: arrived.append(m.topic.split("/")[-3])
    listener.on_connect = lambda client, *args: client.subscribe(f"{root}/+/cmd/job", qos=1)
    listener.on_subscribe = lambda *args: subscribed.set()
    settings = parse_broker_url(url)
    listener.connect(settings.host, settings.port)
    listener.loop_start()
    wait_for(subscribed.is_set, WAIT_S)  # the listener's SUBACK
    return listener, arrived


class FailingAfterJobs(LocalFleetPort):
    """The fleet state, unavailable to the bridge's ticks once it has handed out the jobs."""

    def __init__(self, service: FleetService) -> None:
        super().__init__(service)
        self.failing = False

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        if self.failing:
            raise Unavailable("the fleet actor is restarting")
        handed_out = super().tick(acknowledged)
        self.failing = bool(handed_out)
        return handed_out


@contextmanager
def fleet_of_jobs(mosquitto, port_type=LocalFleetPort) -> Iterator[tuple]:
    """DEVICES devices, each with a fine-tune job, behind a bridge whose broker window is
    WINDOW and whose bound is HELD_MAX; yields the bridge, its port, the devices, the job
    topics' arrivals, and paho's held count each time a row was handed to it."""
    config = make_config(mosquitto.workdir / "state", max_concurrent_jobs=DEVICES)
    config = dataclasses.replace(
        config, mqtt=parse_broker_url(mosquitto.url), tick_interval_s=IDLE_TICK_S
    )
    service = FleetService(config)
    port = port_type(service)
    devices = [SimDevice(f"pi-{i:03d}", service.fleet.clock) for i in range(DEVICES)]
    port.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    listener, arrived = job_listener(mosquitto.url, config.topic_root)
    bridge = MqttBridge(config, port, FleetMetrics())
    bridge.start()
    try:
        wait_for(lambda: bridge.connected, WAIT_S)  # the bridge's connection
        client = bridge._client
        client._max_inflight_messages = WINDOW
        held: list[int] = []  # paho's publishes beyond flight, as each row is handed to it
        publish = client.publish

        def counted(*args, **kwargs):
            held.append(client.held_beyond_flight())
            return publish(*args, **kwargs)

        client.publish = counted
        port.request_finetune(None, None, True)
        bridge.wake()
        yield bridge, port, devices, arrived, held
    finally:
        bridge.stop()
        listener.loop_stop()
        listener.disconnect()
        service.close()


def test_a_burst_of_jobs_waits_in_the_driver_beyond_the_bound_and_every_job_arrives(
    mosquitto, monkeypatch
):
    monkeypatch.setattr(bridge_module, "OUTBOUND_HELD_MAX", HELD_MAX)
    with fleet_of_jobs(mosquitto) as (bridge, port, devices, arrived, held):
        wait_for(lambda: len(arrived) >= DEVICES, WAIT_S)  # every job at its device

        def all_acknowledged() -> bool:
            bridge.wake()  # a tick tells the fleet state what the broker acknowledged last
            return port.service.fleet.outbox.backlog() == 0

        wait_for(all_acknowledged, WAIT_S)  # every row acknowledged
    assert sorted(arrived) == sorted(d.device_id for d in devices)  # each once, none lost
    assert len(held) == DEVICES  # each row handed to paho once
    assert max(held) == HELD_MAX - 1  # paho held as many as the bound allowed, never more


def test_rows_held_back_go_out_while_the_fleet_state_is_unavailable(mosquitto, monkeypatch):
    monkeypatch.setattr(bridge_module, "OUTBOUND_HELD_MAX", HELD_MAX)
    with fleet_of_jobs(mosquitto, FailingAfterJobs) as (_, port, devices, arrived, held):
        wait_for(lambda: len(arrived) >= DEVICES, WAIT_S)  # every job at its device
        assert port.failing  # every tick since the jobs' hand-out failed
    assert sorted(arrived) == sorted(d.device_id for d in devices)
    assert max(held) == HELD_MAX - 1


class SameRowsEachTick:
    """A fleet state that hands out the same rows at every tick, as a restarted actor hands
    out every row not acknowledged."""

    def __init__(self, rows: list[Outbound]) -> None:
        self.rows = rows

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        return list(self.rows)


def fleet_rows(tmp_path, count: int) -> list[Outbound]:
    """`count` fine-tune jobs as a fleet state hands them out, in outbox order."""
    service = FleetService(make_config(tmp_path, max_concurrent_jobs=count))
    devices = [SimDevice(f"pi-{i:02d}", service.fleet.clock) for i in range(count)]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    service.request_finetune(all_=True)
    rows = service.tick()
    service.close()
    assert len(rows) == count
    return rows


def test_a_row_held_back_is_not_queued_again_when_a_restarted_actor_hands_it_out(
    tmp_path, monkeypatch
):
    rows = fleet_rows(tmp_path, 20)
    client = FakeClient(None, "coordinator")
    config = make_config(tmp_path / "bridge")
    bridge = MqttBridge(config, SameRowsEachTick(rows), FleetMetrics(),
                        client_factory=lambda *args, **kwargs: client)  # fmt: skip
    room = [5]  # paho takes this many, then holds as many as the bound allows
    monkeypatch.setattr(
        bridge, "_held_by_paho", lambda: HELD_MAX * (len(client.published) >= room[0])
    )
    monkeypatch.setattr(bridge_module, "OUTBOUND_HELD_MAX", HELD_MAX)
    bridge._publish_handed_out()
    bridge._publish_handed_out()  # the same 20 again: 15 of them held back already
    assert len(bridge._unpublished) == 15
    room[0] = 100
    bridge._publish_handed_out()
    topics = [topic for topic, *_ in client.published]
    assert len(topics) == len(set(topics)) == 20  # each row published once


def test_a_row_whose_publish_raises_is_skipped_and_the_rows_after_it_still_go_out(tmp_path):
    rows = fleet_rows(tmp_path, 6)
    client = FakeClient(None, "coordinator")
    broken_topic = f"fleet/{rows[2].device_id}/cmd/job"
    publish = client.publish

    def publish_or_raise(topic, *args, **kwargs):
        if topic == broken_topic:
            raise ValueError("a message paho cannot take")
        return publish(topic, *args, **kwargs)

    client.publish = publish_or_raise
    bridge = MqttBridge(make_config(tmp_path / "bridge"), SameRowsEachTick(rows[:0]),
                        FleetMetrics(), client_factory=lambda *args, **kwargs: client)  # fmt: skip
    with pytest.raises(ValueError):
        bridge._to_paho(rows)
    assert bridge._unpublished == rows[3:]  # the rows after it wait; it stays in the outbox
    bridge._publish_handed_out()
    devices = [topic.split("/")[1] for topic, *_ in client.published]
    assert devices == [r.device_id for r in rows if r is not rows[2]]


def test_rows_a_restarted_actor_hands_out_again_go_behind_none_that_are_newer(tmp_path):
    rows = fleet_rows(tmp_path, 5)
    held_back, again = rows[2:4], [rows[0], rows[4]]
    assert _in_order(held_back, again) == [rows[0], rows[2], rows[3], rows[4]]
    assert _in_order(rows[:2], rows[2:]) == rows
