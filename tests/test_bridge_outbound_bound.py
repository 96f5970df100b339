"""The bridge hands paho at most OUTBOUND_HELD_MAX publishes beyond those in flight: the rest of a
burst waits in the driver as outbox rows, and PUBACKs ask for the ticks that send them. A real
mosquitto, the fleet state in this process (no Ray), a lean listener counting what arrives."""

from __future__ import annotations

import dataclasses
import threading
import time

from coordinator import bridge as bridge_module
from coordinator.bridge import MqttBridge
from coordinator.metrics import FleetMetrics
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.mqtt import make_client, parse_broker_url
from tests.coord_fleet_helpers import SimDevice, make_config

DEVICES = 120
WINDOW = 5  # publishes in flight: the broker's window, made small so that most of a burst waits
HELD_MAX = 10
# Far longer than the test may wait: a row held back goes out because a PUBACK asked for a tick.
IDLE_TICK_S = 60.0


def wait_until(what: str, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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
    wait_until("the listener's SUBACK", subscribed.is_set)
    return listener, arrived


def test_a_burst_of_jobs_waits_in_the_driver_beyond_the_bound_and_every_job_arrives(
    mosquitto, monkeypatch
):
    monkeypatch.setattr(bridge_module, "OUTBOUND_HELD_MAX", HELD_MAX)
    config = make_config(mosquitto.workdir / "state", max_concurrent_jobs=DEVICES)
    config = dataclasses.replace(
        config, mqtt=parse_broker_url(mosquitto.url), tick_interval_s=IDLE_TICK_S
    )
    service = FleetService(config)
    port = LocalFleetPort(service)
    devices = [SimDevice(f"pi-{i:03d}", service.fleet.clock) for i in range(DEVICES)]
    port.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    listener, arrived = job_listener(mosquitto.url, config.topic_root)
    bridge = MqttBridge(config, port, FleetMetrics())
    bridge.start()
    try:
        wait_until("the bridge's connection", lambda: bridge.connected)
        client = bridge._client
        client._max_inflight_messages = WINDOW
        held: list[int] = []  # paho's publishes beyond flight, as each row is handed to it
        publish = client.publish
        client.publish = lambda *a, **k: (
            held.append(client.held_beyond_flight()),
            publish(*a, **k),
        )[1]
        port.request_finetune(None, None, True)
        bridge.wake()
        wait_until("every job at its device", lambda: len(arrived) >= DEVICES)
        bridge.wake()  # a tick tells the fleet state what the broker acknowledged last
        wait_until("every row acknowledged", lambda: service.fleet.outbox.backlog() == 0)
    finally:
        bridge.stop()
        listener.loop_stop()
        listener.disconnect()
        service.close()
    assert sorted(arrived) == sorted(d.device_id for d in devices)  # each once, none lost
    assert len(held) == DEVICES  # each row handed to paho once
    assert max(held) == HELD_MAX - 1  # paho held as many as the bound allowed, never more
