"""LeanClient reads what its socket holds in one recv() and hands paho every whole packet in it;
a packet's start waits for its end. A real broker's mixed traffic arrives whole and in order."""

from __future__ import annotations

import struct
from collections import deque

import pytest
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes

from shared import lean_client
from shared.lean_client import READ_CHUNK, next_packet
from shared.mqtt import MqttSettings, make_client
from tests.test_lean_client import (
    listener_and_publisher,
    publish_body,
    received_by,
    stop,
    until_all_in,
)
from tests.test_loadgen_client import remaining_length

SETTINGS = MqttSettings("localhost")
# paho's record of the packet being read, as paho's own _packet_read resets it after one
PAHO_BETWEEN_PACKETS = {"command": 0, "have_remaining": 0, "remaining_count": [],
                        "remaining_mult": 1, "remaining_length": 0, "packet": bytearray(b""),
                        "to_process": 0, "pos": 0}  # fmt: skip


def packet(command: int, body: bytes) -> bytes:
    return bytes([command]) + remaining_length(len(body)) + body


def publish(index: int, size: int = 10) -> bytes:
    payload = str(index).encode().ljust(size, b".")
    return packet(0x30, publish_body(b"fleet/pi-1/telemetry", payload, mid=None, properties=b"\0"))


class FakeSocket:
    """Gives each recv() the next chunk (at most what was asked for), then would block."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = deque(chunks)
        self.reads: list[int] = []

    def recv(self, size: int) -> bytes:
        self.reads.append(size)
        if not self.chunks:
            raise BlockingIOError
        chunk = self.chunks.popleft()
        if len(chunk) > size:
            self.chunks.appendleft(chunk[size:])
        return chunk[:size]

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "data,expected",
    [
        (b"\xd0\x00", (0xD0, 2, 2)),  # a PINGRESP: no body
        (b"\x40\x02\x00\x07rest", (0x40, 2, 4)),  # a PUBACK, then the next packet's start
        (b"\x30", None),  # the length not there yet
        (b"\x30\x80", None),  # the length's second byte not there yet
        (b"\x30\x05abc", None),  # the body not all there
        (b"\x30\x80\x01" + b"x" * 128, (0x30, 3, 131)),  # a two-byte length
    ],
)
def test_next_packet_finds_a_whole_packet_and_waits_for_a_partial_one(data, expected):
    assert next_packet(bytearray(data), 0) == expected


def test_a_remaining_length_past_four_bytes_is_malformed():
    with pytest.raises(MalformedPacket):
        next_packet(bytearray(b"\x30\xff\xff\xff\xff\x01"), 0)


def reading_client(*chunks: bytes):
    client = make_client(SETTINGS, "coord", manual_ack=True, lean=True)
    messages = received_by(client)
    client._sock = FakeSocket(*chunks)
    return client, messages


def test_one_read_hands_every_whole_packet_to_paho_and_keeps_a_partial_one_for_the_next():
    third = publish(3)
    client, messages = reading_client(publish(1) + publish(2) + third[:5], third[5:])
    # one recv() for two packets and a start
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [m.payload[:1] for m in messages] == [b"1", b"2"]
    assert client._sock.reads == [READ_CHUNK]
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [m.payload[:1] for m in messages] == [b"1", b"2", b"3"]
    assert client._in_packet == PAHO_BETWEEN_PACKETS  # paho's record left as paho leaves it
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_AGAIN  # nothing more: would block
    assert client._sock.reads == [READ_CHUNK] * 3


def test_loop_read_makes_as_many_reads_as_paho_one_with_nothing_in_flight():
    """paho reads a packet per message in flight (at least one) in a loop_read; each read is
    now a chunk: what is left is read when select() says the socket is readable again."""
    client, messages = reading_client(publish(1), publish(2))
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [m.payload[:1] for m in messages] == [b"1"] and len(client._sock.reads) == 1
    client.loop_read()
    assert [m.payload[:1] for m in messages] == [b"1", b"2"]


def test_a_packet_larger_than_a_read_is_handled_once_all_of_it_is_in():
    big = publish(7, size=3 * READ_CHUNK)
    client, messages = reading_client(big)
    for _ in range(3):  # each read filled: the packet's end is still to come
        assert client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert messages == []
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    (message,) = messages
    assert len(message.payload) == 3 * READ_CHUNK


def test_a_new_connection_starts_with_nothing_unread_from_the_last():
    client, messages = reading_client(publish(1)[:6])
    client._packet_read()
    client._sock = FakeSocket(publish(2))  # reconnected: the old start is not this one's
    client._packet_read()
    assert [m.payload[:1] for m in messages] == [b"2"]


def test_a_closed_socket_or_a_failed_read_is_a_lost_connection_and_drops_a_cut_packet():
    client, _ = reading_client(publish(1)[:6], b"")
    client._packet_read()
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert not client._unread  # the packet the connection cut short: dropped with it

    class Failing(FakeSocket):
        def recv(self, size: int) -> bytes:
            raise ConnectionResetError

    client._sock = Failing()
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST


def test_a_malformed_length_is_a_protocol_error_and_what_came_before_it_is_handled():
    client, messages = reading_client(publish(1) + b"\x30\xff\xff\xff\xff\x01")
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert [m.payload[:1] for m in messages] == [b"1"]


def test_a_handler_error_stops_the_read_there(monkeypatch):
    puback = packet(PacketTypes.PUBACK << 4, struct.pack("!HBB", 9, 0x87, 0))
    client, messages = reading_client(publish(1) + puback + publish(2))
    handled = []
    original = client._packet_handle

    def handle():
        handled.append(client._in_packet["command"])
        if client._in_packet["command"] == PacketTypes.PUBACK << 4:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        return original()

    monkeypatch.setattr(client, "_packet_handle", handle)
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert handled == [0x30, PacketTypes.PUBACK << 4]  # the publish after it: not handled
    assert [m.payload[:1] for m in messages] == [b"1"]


def test_a_burst_of_mixed_sizes_through_a_real_broker_arrives_whole_and_in_order(mosquitto):
    listener, publisher, received, acked = listener_and_publisher(mosquitto, "reads", 1000)
    reads = []
    real_recv = lean_client.LeanClient._sock_recv
    listener._sock_recv = lambda size: reads.append(size) or real_recv(listener, size)
    sizes = [10, 200, 13_000, 70_000, 5]
    expected = [str(i).encode().ljust(sizes[i % 5], b".") for i in range(300)]
    try:
        with publisher.publishing_many():
            for payload in expected:
                publisher.publish("reads/x", payload, qos=1)
        until_all_in(received, acked, 300)
        assert received == expected and len(acked) == 300
        assert len(reads) < 300  # many packets a read (paho: 4 or more reads each)
    finally:
        stop(listener, publisher)


def test_nothing_after_a_disconnect_in_the_same_read_is_handled():
    """paho reads no packet once a DISCONNECT closed the connection; nor does this."""
    disconnect = packet(0xE0, b"\x00")
    client, messages = reading_client(publish(1) + disconnect + publish(2) + publish(3))
    client._protocol = 5
    client.on_disconnect = lambda *args: messages.append("disconnected")
    client._packet_read()
    assert [m if m == "disconnected" else m.payload[:1] for m in messages] == [b"1", "disconnected"]


def test_whole_packets_left_behind_by_a_callback_that_raised_are_handled_first_next_time():
    client, messages = reading_client(publish(1) + publish(2) + publish(3))
    raised = []

    def on_message(client, userdata, message):
        if message.payload[:1] == b"1" and not raised:
            raised.append(1)
            raise RuntimeError("a callback's bug")
        messages.append(message)

    client.on_message = on_message
    client.suppress_exceptions = False
    with pytest.raises(RuntimeError):
        client._packet_read()
    assert client._packet_read() == MQTTErrorCode.MQTT_ERR_AGAIN  # the socket has nothing new
    assert [m.payload[:1] for m in messages] == [b"2", b"3"]  # not held till more arrives
