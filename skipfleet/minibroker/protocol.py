"""The MQTT 3.1.1 / 5.0 packet codec: framing and decoding what clients send (encoding.py holds
the other direction). Pure functions over bytes; no I/O and no broker state.

Every packet is framed the same way (§2.1):

    byte 0          [type: 4 bits][flags: 4 bits]
    bytes 1..4      remaining length: variable byte integer, 1 to 4 bytes
    then            variable header + payload: `remaining length` bytes
"""

from __future__ import annotations

from dataclasses import dataclass

from skipfleet.minibroker.codes import (
    PacketError,
    PacketType,
    PropertyId,
    ProtocolLevel,
    ReasonCode,
    RetainHandling,
    malformed,
    protocol_error,
)
from skipfleet.minibroker.packets import (
    NO_PROPERTIES,
    SESSION_NEVER_EXPIRES,
    Connect,
    Disconnect,
    MessageProperties,
    Packet,
    PacketIdAck,
    PingReq,
    Publish,
    Subscribe,
    SubscriptionOptions,
    Unsubscribe,
    Will,
)
from skipfleet.minibroker.topics import is_valid_topic_name
from skipfleet.minibroker.wire import Reader, read_properties

# ---- framing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    """Where one complete packet lies in a receive buffer (absolute offsets)."""

    first_byte: int
    body_start: int
    end: int


def find_frame(buffer: bytes | bytearray, max_packet_size: int, start: int = 0) -> Frame | None:
    """The packet starting at `buffer[start]`, or None until all its bytes have arrived.

    Checks the size as soon as the remaining length is known, so an oversized packet is refused
    before the broker buffers it.
    """
    length, shift, pos = 0, 0, start + 1
    while True:
        if pos >= len(buffer):
            return None
        if pos > start + 4:
            raise malformed("remaining length longer than 4 bytes")
        digit = buffer[pos]
        length |= (digit & 0x7F) << shift
        pos += 1
        if not digit & 0x80:
            break
        shift += 7
    end = pos + length
    if end - start > max_packet_size:
        raise PacketError(ReasonCode.PACKET_TOO_LARGE, f"{end - start} bytes > {max_packet_size}")
    return Frame(buffer[start], pos, end) if end <= len(buffer) else None


# Enum attribute access is slow on Python 3.11; the per-packet paths use these plain references.
_BY_CODE: tuple[PacketType | None, ...] = (None, *PacketType)
_PUBLISH, _CONNECT, _AUTH = PacketType.PUBLISH, PacketType.CONNECT, PacketType.AUTH
_V5 = ProtocolLevel.MQTT_5
_FLAGS_0010 = frozenset({PacketType.PUBREL, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE})


def packet_type(first_byte: int) -> PacketType:
    """The type of a framed packet, its fixed-header flags checked (§2.1.3)."""
    kind, flags = _BY_CODE[first_byte >> 4], first_byte & 0x0F
    if kind is None:
        raise malformed("packet type 0 is reserved")
    if kind is _PUBLISH:
        return kind
    expected = 0b0010 if kind in _FLAGS_0010 else 0
    if flags != expected:
        raise malformed(f"{kind.name} with fixed-header flags {flags:04b}")
    return kind


# ---- decoding ----------------------------------------------------------------------------------


def decode_packet(first_byte: int, body: bytes, level: ProtocolLevel) -> Packet:
    """One packet from a connected client (CONNECT included: the caller refuses a second one)."""
    kind = packet_type(first_byte)
    if kind is _CONNECT:
        return decode_connect(body)
    if kind is _AUTH and level is not _V5:
        raise malformed("packet type 15 is reserved in MQTT 3.1.1")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise protocol_error(f"a client may not send {kind.name} to this broker")
    return decoder(first_byte & 0x0F, Reader(body), level)


# CONNECT variable header and payload (§3.1):
#   protocol name "MQTT" (utf8) | level (byte) | flags (byte) | keep alive (uint16) | [props: 5]
#   flags:  [user name][password][will retain][will QoS: 2 bits][will][clean start][reserved 0]
#   payload: client id | [will props: 5] will topic, will payload (if will) | user | password
_CONNECT_PROPERTIES = frozenset(
    {
        PropertyId.SESSION_EXPIRY_INTERVAL,
        PropertyId.RECEIVE_MAXIMUM,
        PropertyId.MAXIMUM_PACKET_SIZE,
        PropertyId.TOPIC_ALIAS_MAXIMUM,
        PropertyId.REQUEST_RESPONSE_INFORMATION,
        PropertyId.REQUEST_PROBLEM_INFORMATION,
        PropertyId.USER_PROPERTY,
        PropertyId.AUTHENTICATION_METHOD,
        PropertyId.AUTHENTICATION_DATA,
    }
)
_WILL_PROPERTIES = frozenset(
    {
        PropertyId.WILL_DELAY_INTERVAL,
        PropertyId.PAYLOAD_FORMAT_INDICATOR,
        PropertyId.MESSAGE_EXPIRY_INTERVAL,
        PropertyId.CONTENT_TYPE,
        PropertyId.RESPONSE_TOPIC,
        PropertyId.CORRELATION_DATA,
        PropertyId.USER_PROPERTY,
    }
)


def decode_connect(body: bytes) -> Connect:
    reader = Reader(body)
    level = _read_protocol_level(reader)
    flags = reader.byte()
    if flags & 0x01:
        raise malformed("CONNECT reserved flag is set")
    keepalive_s = reader.uint16()
    v5 = level is ProtocolLevel.MQTT_5
    props = read_properties(reader, _CONNECT_PROPERTIES) if v5 else {}
    client_id = reader.utf8()
    will = _read_will(reader, flags, v5)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if has_password and not (has_user or v5):
        raise malformed("password without user name")
    username = reader.utf8() if has_user else None
    password = reader.binary() if has_password else None
    if not reader.at_end:
        raise malformed("bytes after the CONNECT payload")
    clean_start = bool(flags & 0x02)
    return Connect(
        level=level,
        client_id=client_id,
        clean_start=clean_start,
        keepalive_s=keepalive_s,
        username=username,
        password=password,
        will=will,
        session_expiry_s=_session_expiry(props, clean_start, v5),
        receive_maximum=_nonzero(props, PropertyId.RECEIVE_MAXIMUM, 65535),
        maximum_packet_size=_nonzero(props, PropertyId.MAXIMUM_PACKET_SIZE, None),
        authentication_method=props.get(PropertyId.AUTHENTICATION_METHOD),
    )


def _read_protocol_level(reader: Reader) -> ProtocolLevel:
    name = reader.utf8()
    level = reader.byte()
    if name == "MQIsdp" and level == ProtocolLevel.MQTT_3_1:
        raise PacketError(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, "MQTT 3.1 is not supported")
    if name != "MQTT":
        raise malformed(f"protocol name {name!r}")
    if level not in (ProtocolLevel.MQTT_3_1_1, ProtocolLevel.MQTT_5):
        raise PacketError(ReasonCode.UNSUPPORTED_PROTOCOL_VERSION, f"protocol level {level}")
    return ProtocolLevel(level)


def _read_will(reader: Reader, flags: int, v5: bool) -> Will | None:
    qos, retain = (flags >> 3) & 0x03, bool(flags & 0x20)
    if not flags & 0x04:
        if qos or retain:
            raise malformed("will QoS or retain without a will")
        return None
    if qos == 3:
        raise malformed("will QoS 3")
    props = read_properties(reader, _WILL_PROPERTIES) if v5 else {}
    topic = reader.utf8()
    if not is_valid_topic_name(topic):
        raise PacketError(ReasonCode.TOPIC_NAME_INVALID, "will topic")
    payload = reader.binary()
    return Will(
        topic=topic,
        payload=payload,
        qos=qos,
        retain=retain,
        delay_s=props.get(PropertyId.WILL_DELAY_INTERVAL, 0),
        properties=MessageProperties.from_properties(props) if props else NO_PROPERTIES,
    )


def _session_expiry(props: dict, clean_start: bool, v5: bool) -> int:
    if v5:
        return props.get(PropertyId.SESSION_EXPIRY_INTERVAL, 0)
    return 0 if clean_start else SESSION_NEVER_EXPIRES


def _nonzero(props: dict, prop: PropertyId, default: int | None) -> int | None:
    value = props.get(prop, default)
    if value == 0:
        raise protocol_error(f"{prop.name} of 0")
    return value


# PUBLISH (§3.3):  flags [dup][QoS: 2 bits][retain]
#   topic name (utf8) | packet id (uint16, QoS 1 and 2 only) | [props: 5] | payload (the rest)
_PUBLISH_PROPERTIES = frozenset(
    {
        PropertyId.PAYLOAD_FORMAT_INDICATOR,
        PropertyId.MESSAGE_EXPIRY_INTERVAL,
        PropertyId.CONTENT_TYPE,
        PropertyId.RESPONSE_TOPIC,
        PropertyId.CORRELATION_DATA,
        PropertyId.SUBSCRIPTION_IDENTIFIER,
        PropertyId.TOPIC_ALIAS,
        PropertyId.USER_PROPERTY,
    }
)


def _decode_publish(flags: int, reader: Reader, level: ProtocolLevel) -> Publish:
    qos, dup, retain = (flags >> 1) & 0x03, bool(flags & 0x08), bool(flags & 0x01)
    if qos == 3:
        raise malformed("PUBLISH with QoS 3")
    if dup and qos == 0:
        raise malformed("DUP set on a QoS 0 PUBLISH")
    topic = reader.utf8()
    packet_id = _read_packet_id(reader) if qos else 0
    properties = NO_PROPERTIES
    if level is _V5:
        props = read_properties(reader, _PUBLISH_PROPERTIES)
        if PropertyId.TOPIC_ALIAS in props:
            # CONNACK said Topic Alias Maximum 0: any alias is out of range (§3.3.2.3.4).
            raise PacketError(ReasonCode.TOPIC_ALIAS_INVALID, "topic aliases are not supported")
        if PropertyId.SUBSCRIPTION_IDENTIFIER in props:
            raise protocol_error("a client may not send a subscription identifier")
        if props:
            properties = MessageProperties.from_properties(props)
    if not topic:
        raise protocol_error("empty topic name and no topic alias")
    if not is_valid_topic_name(topic):
        raise PacketError(ReasonCode.TOPIC_NAME_INVALID, topic)
    return Publish(topic, reader.rest(), qos, retain, dup, packet_id, properties)


def _read_packet_id(reader: Reader) -> int:
    packet_id = reader.uint16()
    if packet_id == 0:
        raise malformed("packet identifier 0")
    return packet_id


# PUBACK / PUBREC / PUBREL / PUBCOMP (§3.4-3.7):
#   packet id (uint16) | [5: reason code (byte, absent = 0)] | [5: props (reason string, user)]
_ACK_PROPERTIES = frozenset({PropertyId.REASON_STRING, PropertyId.USER_PROPERTY})


def _decode_ack(kind: PacketType):
    def decode(flags: int, reader: Reader, level: ProtocolLevel) -> PacketIdAck:
        packet_id = _read_packet_id(reader)
        reason = 0
        if level is _V5 and not reader.at_end:
            reason = reader.byte()
            if not reader.at_end:
                read_properties(reader, _ACK_PROPERTIES)
        if not reader.at_end:
            raise malformed(f"bytes after the {kind.name}")
        return PacketIdAck(kind, packet_id, reason)

    return decode


# SUBSCRIBE (§3.8):  packet id (uint16) | [props: 5] | (topic filter (utf8), options (byte))+
#   options: [reserved: 2 bits][5: retain handling: 2 bits][5: retain as published][5: no local]
#            [maximum QoS: 2 bits]   (MQTT 3.1.1: the six high bits are reserved, all 0)
_SUBSCRIBE_PROPERTIES = frozenset({PropertyId.SUBSCRIPTION_IDENTIFIER, PropertyId.USER_PROPERTY})


def _decode_subscribe(flags: int, reader: Reader, level: ProtocolLevel) -> Subscribe:
    packet_id = _read_packet_id(reader)
    v5 = level is ProtocolLevel.MQTT_5
    if v5 and PropertyId.SUBSCRIPTION_IDENTIFIER in read_properties(reader, _SUBSCRIBE_PROPERTIES):
        # CONNACK said Subscription Identifier Available 0 (§3.8.2.1.2).
        raise PacketError(
            ReasonCode.SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED, "subscription identifiers"
        )
    requests = []
    while not reader.at_end:
        topic_filter = reader.utf8()
        requests.append((topic_filter, _subscription_options(reader.byte(), v5)))
    if not requests:
        raise protocol_error("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(requests))


def _subscription_options(options: int, v5: bool) -> SubscriptionOptions:
    qos = options & 0x03
    if qos == 3:
        raise malformed("subscription QoS 3")
    if not v5:
        if options >= 4:
            raise malformed("reserved subscription option bits set")
        return SubscriptionOptions(qos)
    if options >= 64:
        raise malformed("reserved subscription option bits set")
    retain_handling = (options >> 4) & 0x03
    if retain_handling == 3:
        raise protocol_error("retain handling 3")
    return SubscriptionOptions(
        qos=qos,
        no_local=bool(options & 0x04),
        retain_as_published=bool(options & 0x08),
        retain_handling=RetainHandling(retain_handling),
    )


# UNSUBSCRIBE (§3.10):  packet id (uint16) | [props: 5] | (topic filter (utf8))+
_UNSUBSCRIBE_PROPERTIES = frozenset({PropertyId.USER_PROPERTY})


def _decode_unsubscribe(flags: int, reader: Reader, level: ProtocolLevel) -> Unsubscribe:
    packet_id = _read_packet_id(reader)
    if level is ProtocolLevel.MQTT_5:
        read_properties(reader, _UNSUBSCRIBE_PROPERTIES)
    filters = []
    while not reader.at_end:
        filters.append(reader.utf8())
    if not filters:
        raise protocol_error("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(filters))


def _decode_pingreq(flags: int, reader: Reader, level: ProtocolLevel) -> PingReq:
    if not reader.at_end:
        raise malformed("PINGREQ with a body")
    return PingReq()


# DISCONNECT (§3.14):  [5: reason code (byte, absent = 0)] | [5: props]   (3.1.1: empty)
_DISCONNECT_PROPERTIES = frozenset(
    {
        PropertyId.SESSION_EXPIRY_INTERVAL,
        PropertyId.REASON_STRING,
        PropertyId.USER_PROPERTY,
        PropertyId.SERVER_REFERENCE,
    }
)


def _decode_disconnect(flags: int, reader: Reader, level: ProtocolLevel) -> Disconnect:
    if level is not ProtocolLevel.MQTT_5 or reader.at_end:
        if not reader.at_end:
            raise malformed("MQTT 3.1.1 DISCONNECT with a body")
        return Disconnect()
    reason = reader.byte()
    props = {} if reader.at_end else read_properties(reader, _DISCONNECT_PROPERTIES)
    if not reader.at_end:
        raise malformed("bytes after the DISCONNECT properties")
    return Disconnect(reason, props.get(PropertyId.SESSION_EXPIRY_INTERVAL))


_DECODERS = {
    PacketType.PUBLISH: _decode_publish,
    PacketType.PUBACK: _decode_ack(PacketType.PUBACK),
    PacketType.PUBREC: _decode_ack(PacketType.PUBREC),
    PacketType.PUBREL: _decode_ack(PacketType.PUBREL),
    PacketType.PUBCOMP: _decode_ack(PacketType.PUBCOMP),
    PacketType.SUBSCRIBE: _decode_subscribe,
    PacketType.UNSUBSCRIBE: _decode_unsubscribe,
    PacketType.PINGREQ: _decode_pingreq,
    PacketType.DISCONNECT: _decode_disconnect,
}
