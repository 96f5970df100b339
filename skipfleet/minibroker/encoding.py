"""Encoding the packets the broker sends (the other half of protocol.py's codec)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from skipfleet.minibroker.codes import (
    PacketType,
    PropertyId,
    ProtocolLevel,
    ReasonCode,
    connack_code_v311,
)
from skipfleet.minibroker.wire import (
    encode_properties,
    encode_uint16,
    encode_utf8,
    encode_varint,
)

PINGRESP = bytes((PacketType.PINGRESP << 4, 0))
# Enum attribute access is slow on Python 3.11; the per-message paths use plain references.
_V5, _SUCCESS = ProtocolLevel.MQTT_5, ReasonCode.SUCCESS
_PUBLISH_BITS, _PUBREL = PacketType.PUBLISH << 4, PacketType.PUBREL
_EMPTY_PROPERTIES = b"\x00"


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


def encode_connack(
    level: ProtocolLevel,
    session_present: bool,
    reason: ReasonCode,
    properties: Iterable[tuple[PropertyId, Any]] = (),
) -> bytes:
    """CONNACK (§3.2): flags (byte, bit 0 = session present) | code (byte) | [props: 5]."""
    flags = 1 if session_present and reason is ReasonCode.SUCCESS else 0
    if level is ProtocolLevel.MQTT_5:
        body = bytes((flags, reason)) + encode_properties(properties)
    else:
        body = bytes((flags, connack_code_v311(reason)))
    return _packet(PacketType.CONNACK << 4, body)


def encode_publish(
    level: ProtocolLevel,
    topic: bytes,
    payload: bytes,
    *,
    qos: int,
    retain: bool,
    dup: bool = False,
    packet_id: int = 0,
    properties: bytes = b"",
) -> bytes:
    """PUBLISH (§3.3). `topic` is already length-prefixed UTF-8; `properties` the property
    bodies without their length (MQTT 5 only, ignored for 3.1.1)."""
    first = _PUBLISH_BITS | dup << 3 | qos << 1 | retain
    head = topic + encode_uint16(packet_id) if qos else topic
    if level is _V5:
        head += encode_varint(len(properties)) + properties
    return bytes((first,)) + encode_varint(len(head) + len(payload)) + head + payload


def encode_ack(
    kind: PacketType, packet_id: int, level: ProtocolLevel, reason: int = ReasonCode.SUCCESS
) -> bytes:
    """PUBACK/PUBREC/PUBREL/PUBCOMP: packet id | [5: reason code, left out when 0]."""
    first = kind << 4 | (0b0010 if kind is _PUBREL else 0)
    body = encode_uint16(packet_id)
    if level is _V5 and reason != _SUCCESS:
        body += bytes((reason,))
    return _packet(first, body)


def encode_suback(level: ProtocolLevel, packet_id: int, codes: Sequence[int]) -> bytes:
    """SUBACK (§3.9): packet id | [props: 5] | one code per filter."""
    props = _EMPTY_PROPERTIES if level is ProtocolLevel.MQTT_5 else b""
    return _packet(PacketType.SUBACK << 4, encode_uint16(packet_id) + props + bytes(codes))


def encode_unsuback(level: ProtocolLevel, packet_id: int, codes: Sequence[int]) -> bytes:
    """UNSUBACK (§3.11): packet id | [5: props | one code per filter] (3.1.1: no payload)."""
    body = encode_uint16(packet_id)
    if level is ProtocolLevel.MQTT_5:
        body += _EMPTY_PROPERTIES + bytes(codes)
    return _packet(PacketType.UNSUBACK << 4, body)


def encode_disconnect(reason: ReasonCode) -> bytes:
    """MQTT 5 DISCONNECT from the server: reason code, no properties."""
    return _packet(PacketType.DISCONNECT << 4, bytes((reason,)))


def encode_topic(topic: str) -> bytes:
    return encode_utf8(topic)
