"""LeanClient reads common PUBLISH and PUBACK packets itself: the same message as paho's, and
everything else (QoS 2, failures, malformed packets) still read by paho."""

from __future__ import annotations

import dataclasses
import struct
import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.lean_client import LeanClient, NotCommonForm, split_publish, successful_puback_mid
from shared.mqtt import MqttProtocol, MqttSettings, _publish_template, make_client, parse_broker_url

SETTINGS = MqttSettings("localhost")


def device_properties() -> bytes:
    return bytes(_publish_template("heartbeat").pack())


def publish_body(topic: bytes, payload: bytes, *, mid: int | None, properties: bytes) -> bytes:
    packet_id = b"" if mid is None else struct.pack("!H", mid)
    return struct.pack("!H", len(topic)) + topic + packet_id + properties + payload


def feed(client: paho.Client, command: int, body: bytes) -> MQTTErrorCode:
    client._in_packet = {"command": command, "packet": bytearray(body),
                         "remaining_length": len(body)}  # fmt: skip
    result: MQTTErrorCode = client._packet_handle()
    return result


def received_by(client: paho.Client) -> list[paho.MQTTMessage]:
    messages: list[paho.MQTTMessage] = []
    client.on_message = lambda client, userdata, message: messages.append(message)
    return messages


@pytest.mark.parametrize("qos,mid", [(0, None), (1, 513)])
@pytest.mark.parametrize("properties", [b"\x00", device_properties()])
def test_a_publish_reads_as_paho_reads_it(qos, mid, properties):
    header = 0x30 | qos << 1 | 0x08 * (qos > 0) | 0x01
    body = publish_body(b"fleet/pi-1/telemetry", b"\x81\xa1a\x01" * 50, mid=mid,
                        properties=properties)  # fmt: skip
    theirs = _packet.decode_publish(header, body, MQTTProtocolVersion.MQTTv5)
    assert split_publish(header, body) == (theirs.topic, theirs.mid, theirs.payload)

    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    messages = received_by(client)
    assert feed(client, header, body) == MQTTErrorCode.MQTT_ERR_SUCCESS
    (message,) = messages
    assert (message.topic, message.mid, message.qos) == ("fleet/pi-1/telemetry", mid or 0, qos)
    assert (message.retain, message.dup, message.payload) == (True, qos > 0, theirs.payload)
    assert message.properties is None  # not decoded
    assert not client._out_packet  # manual acks: nothing acknowledged on paho's own


def test_without_manual_acks_a_qos1_publish_is_acknowledged_at_once():
    client = make_client(SETTINGS, "coord", lean=True)
    received_by(client)
    client._sock = None
    feed(client, 0x32, publish_body(b"fleet/pi-1/job", b"x", mid=7, properties=b"\x00"))
    assert [packet["packet"] for packet in client._out_packet] == [b"\x40\x02\x00\x07"]


@pytest.mark.parametrize(
    "header,body",
    [
        (0x34, publish_body(b"fleet/pi-1/job", b"x", mid=7, properties=b"\x00")),  # QoS 2
        (0x32, publish_body(b"", b"x", mid=7, properties=b"\x00")),  # a topic alias
        (0x32, publish_body(b"fleet/pi-1/job", b"", mid=7, properties=b"\x09")[:-1]),  # short
        (0x32, publish_body(b"fleet/pi-1/job", b"x", mid=7, properties=b"\xff\xff\xff\xff\x01")),
        (0x30, b"\x00"),
    ],
)
def test_a_publish_in_another_form_is_left_to_paho(header, body):
    with pytest.raises(NotCommonForm):
        split_publish(header, body)


def test_a_malformed_publish_is_refused_by_paho_as_before():
    body = publish_body(b"fleet/pi-1/job", b"", mid=7, properties=b"\x09")[:-1]
    for client in (make_client(SETTINGS, "a", lean=True), make_client(SETTINGS, "b")):
        messages = received_by(client)
        with pytest.raises(_packet.MalformedPacket):
            feed(client, 0x32, body)
        assert messages == []


def published_callbacks(client: paho.Client) -> list[tuple[int, bool]]:
    calls: list[tuple[int, bool]] = []
    client.on_publish = lambda c, u, mid, reason, properties: calls.append((mid, reason.is_failure))
    return calls


def test_a_successful_puback_reaches_on_publish_once():
    client = make_client(SETTINGS, "coord", lean=True)
    calls = published_callbacks(client)
    info = client.publish("fleet/pi-1/cmd/job", b"x", qos=1)  # queued: not connected
    for body in (struct.pack("!H", info.mid), struct.pack("!HB", info.mid, 0)):
        feed(client, PacketTypes.PUBACK << 4, body)  # the second one: a repeat, ignored
    assert calls == [(info.mid, False)]
    assert info.mid not in client._out_messages  # paho's bookkeeping done


def test_a_refused_publish_still_reaches_on_publish_as_a_failure():
    client = make_client(SETTINGS, "coord", lean=True)
    calls = published_callbacks(client)
    info = client.publish("fleet/pi-1/cmd/job", b"x", qos=1)
    feed(client, PacketTypes.PUBACK << 4, struct.pack("!HBB", info.mid, 0x87, 0))
    assert calls == [(info.mid, True)]


@pytest.mark.parametrize("body", [b"\x00", b"\x00\x01\x10", b"\x00\x01\x00\x02\x1f\x00"])
def test_a_puback_with_a_reason_or_properties_is_left_to_paho(body):
    with pytest.raises(NotCommonForm):
        successful_puback_mid(body)


def test_only_v5_clients_are_lean_in_reading():
    client = make_client(MqttSettings("localhost", protocol=MqttProtocol.V311), "old", lean=True)
    messages = received_by(client)
    feed(client, 0x32, struct.pack("!H", 3) + b"a/b" + b"\x00\x05" + b"payload")
    assert messages[0].payload == b"payload" and messages[0].properties is None
    assert isinstance(client, LeanClient)


def test_ack_many_queues_every_puback_as_one_write():
    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    client._thread = threading.current_thread()  # as under loop_start: queued, not written
    client.ack_many([1, 258])
    client.ack_many([])
    (queued,) = client._out_packet
    assert queued["packet"] == b"\x40\x02\x00\x01" + b"\x40\x02\x01\x02"
    assert queued["to_process"] == 8


def test_ack_many_sends_nothing_when_paho_acknowledges_itself():
    client = make_client(SETTINGS, "coord", lean=True)
    client._thread = threading.current_thread()
    client.ack_many([1, 2])
    assert not client._out_packet


def test_the_in_flight_limit_follows_the_brokers_receive_maximum_and_paho_keeps_20_without_one():
    client = make_client(SETTINGS, "coord", lean=True)
    assert client.max_inflight_messages == 20  # paho's own, whatever the broker allows
    client.adopt_receive_maximum(None)  # an MQTT 3.1.1 CONNACK has no properties
    assert client.max_inflight_messages == 20
    granted = Properties(PacketTypes.CONNACK)
    granted.ReceiveMaximum = 1000
    client.adopt_receive_maximum(granted)
    assert client.max_inflight_messages == 1000


def test_a_coordinator_connected_to_the_products_broker_keeps_a_thousand_publishes_in_flight(
    mosquitto,
):
    from coordinator.bridge import MqttBridge
    from coordinator.metrics import FleetMetrics
    from coordinator.ports import LocalFleetPort
    from coordinator.service import FleetService
    from tests.coord_fleet_helpers import make_config

    config = make_config(mosquitto.workdir / "state")
    config = dataclasses.replace(config, mqtt=parse_broker_url(mosquitto.url))
    service = FleetService(config)
    bridge = MqttBridge(config, LocalFleetPort(service), FleetMetrics())
    bridge.start()
    try:
        deadline = time.monotonic() + 10
        while not bridge.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert bridge.connected
        assert bridge._client.max_inflight_messages == 1000  # the broker's max_inflight_messages
    finally:
        bridge.stop()
        service.close()


def listener_and_publisher(mosquitto, topic: str, inflight: int):
    """A listener subscribed to topic/# and a publisher keeping `inflight` QoS 1 publishes in
    flight, both connected and looping; and what the listener received, the publisher's acks."""
    settings = parse_broker_url(mosquitto.url)
    received, acked = [], []
    listener = make_client(settings, "listener", lean=True)
    listener.on_message = lambda client, userdata, message: received.append(message.payload)
    listener.on_connect = lambda client, *args: client.subscribe(f"{topic}/#", qos=1)
    subscribed = threading.Event()
    listener.on_subscribe = lambda *args: subscribed.set()
    publisher = make_client(settings, "publisher", lean=True)
    publisher.max_inflight_messages_set(inflight)
    publisher.on_publish = lambda client, userdata, mid, *args: acked.append(mid)
    for client in (listener, publisher):
        client.connect("127.0.0.1", mosquitto.port)
        client.loop_start()
    deadline = time.monotonic() + 10  # a wait for the broker's answers, not a fixed sleep
    while not (subscribed.is_set() and publisher.is_connected()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert subscribed.is_set() and publisher.is_connected()
    return listener, publisher, received, acked


def until_all_in(received: list, acked: list, count: int) -> None:
    deadline = time.monotonic() + 10
    while (len(received) < count or len(acked) < count) and time.monotonic() < deadline:
        time.sleep(0.02)


def stop(*clients: paho.Client) -> None:
    for client in clients:
        client.loop_stop()
        client.disconnect()


def test_publishing_many_wakes_the_network_thread_every_64_packets_and_delivers_all_in_order(
    mosquitto,
):
    # all 200 sent by this thread, none on a PUBACK
    listener, publisher, received, acked = listener_and_publisher(mosquitto, "many", 1000)
    wakes = []
    real_wake = publisher._wake_network_thread
    publisher._wake_network_thread = lambda: wakes.append(1) or real_wake()
    try:
        with publisher.publishing_many():
            for i in range(200):
                publisher.publish("many/x", str(i).encode(), qos=1)
        until_all_in(received, acked, 200)
        assert received == [str(i).encode() for i in range(200)] and len(acked) == 200
        assert len(wakes) == 200 // 64 + 1  # every 64th packet, and the rest at the end
    finally:
        stop(listener, publisher)


def test_publishes_beyond_the_in_flight_window_go_out_in_order_as_pubacks_free_room(mosquitto):
    # 295 of 300 wait for room at first
    listener, publisher, received, acked = listener_and_publisher(mosquitto, "window", 5)
    try:
        for i in range(300):
            publisher.publish("window/x", str(i).encode(), qos=1)
        assert len(publisher._waiting) >= 300 - 5 - len(acked)  # each ack sends one waiting
        until_all_in(received, acked, 300)
        assert received == [str(i).encode() for i in range(300)] and len(acked) == 300
        assert not publisher._waiting and publisher._inflight_messages == 0
    finally:
        stop(listener, publisher)


def test_after_a_reconnect_reset_what_waits_for_room_is_what_paho_left_queued():
    client = make_client(SETTINGS, "coord", lean=True)
    client.max_inflight_messages_set(2)
    for mid, state in ((7, paho.mqtt_ms_wait_for_puback), (3, paho.mqtt_ms_queued)):
        message = paho.MQTTMessage(mid, b"fleet/pi-1/cmd/job")
        message.qos, message.state = 1, state
        client._out_messages[mid] = message
    client._waiting.extend([3])  # waited for room before the connection was lost
    client._messages_reconnect_reset_out()
    # paho 2.2 marks every message to go again at the CONNACK (it never counts them against
    # the window here), so none waits for room any more: nothing stale is left to send twice
    queued = [mid for mid, m in client._out_messages.items() if m.state == paho.mqtt_ms_queued]
    assert list(client._waiting) == queued == []
    assert [m.state for m in client._out_messages.values()] == [paho.mqtt_ms_publish] * 2


def test_dropped_out_messages_no_longer_wait_for_room():
    client = make_client(SETTINGS, "coord", lean=True)
    message = paho.MQTTMessage(3, b"fleet/pi-1/cmd/job")
    message.qos, message.state = 1, paho.mqtt_ms_queued
    client._out_messages[3] = message
    client._note_queued(3)
    assert client.drop_out_messages() == [message]
    assert not client._waiting  # a later message given mid 3 is not sent ahead of its turn


def a_publish(client: paho.Client, topic: bytes = b"fleet/pi-1/telemetry") -> MQTTErrorCode:
    return feed(client, 0x30, publish_body(topic, b"\x80", mid=None, properties=b"\x00"))


def test_without_filtered_callbacks_a_message_goes_to_on_message_without_a_topic_match():
    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    messages = received_by(client)

    def no_match(topic):
        raise AssertionError(f"matched {topic} against filters nobody added")

    client._on_message_filtered.iter_match = no_match
    assert a_publish(client) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [m.topic for m in messages] == ["fleet/pi-1/telemetry"]


def test_a_filtered_callback_takes_its_topics_and_on_message_the_rest_as_in_paho():
    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    messages = received_by(client)
    filtered: list[str] = []
    client.message_callback_add("fleet/+/status", lambda c, u, m: filtered.append(m.topic))
    a_publish(client, b"fleet/pi-1/status")
    a_publish(client, b"fleet/pi-1/telemetry")
    assert filtered == ["fleet/pi-1/status"]
    assert [m.topic for m in messages] == ["fleet/pi-1/telemetry"]


@pytest.mark.parametrize("suppressed", [False, True])
def test_an_exception_in_on_message_is_raised_unless_suppressed_as_in_paho(suppressed):
    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    client.suppress_exceptions = suppressed

    def failing(client, userdata, message):
        raise ValueError("bad callback")

    client.on_message = failing
    if suppressed:
        assert a_publish(client) == MQTTErrorCode.MQTT_ERR_SUCCESS
    else:
        with pytest.raises(ValueError, match="bad callback"):
            a_publish(client)


def test_a_received_publish_makes_no_lock_of_its_own(monkeypatch):
    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    messages = received_by(client)
    made = []
    real = threading.Condition
    monkeypatch.setattr(paho.threading, "Condition", lambda *a: made.append(1) or real(*a))
    assert a_publish(client) == MQTTErrorCode.MQTT_ERR_SUCCESS
    (message,) = messages
    assert isinstance(message, paho.MQTTMessage) and message.info.mid == 0
    assert made == []  # paho's MQTTMessage makes a Condition (its MQTTMessageInfo's) for each
