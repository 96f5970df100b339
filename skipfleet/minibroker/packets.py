"""The packets a client sends, decoded into frozen dataclasses (protocol.py decodes them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from skipfleet.minibroker.codes import (
    PacketType,
    PropertyId,
    ProtocolLevel,
    ReasonCode,
    RetainHandling,
    protocol_error,
)
from skipfleet.minibroker.topics import is_valid_topic_name
from skipfleet.minibroker.wire import Properties, encode_property

SESSION_NEVER_EXPIRES = 0xFFFFFFFF  # MQTT 5 session expiry meaning "never"; 3.1.1 clean_session=0


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """The MQTT 5 properties an application message carries from publisher to subscribers."""

    payload_format: int | None = None
    expiry_s: int | None = None
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_properties(cls, props: Properties) -> MessageProperties:
        response_topic = props.get(PropertyId.RESPONSE_TOPIC)
        if response_topic is not None and not is_valid_topic_name(response_topic):
            raise protocol_error("response topic is not a valid topic name")
        payload_format = props.get(PropertyId.PAYLOAD_FORMAT_INDICATOR)
        if payload_format not in (None, 0, 1):
            raise protocol_error(f"payload format indicator {payload_format}")
        return cls(
            payload_format=payload_format,
            expiry_s=props.get(PropertyId.MESSAGE_EXPIRY_INTERVAL),
            content_type=props.get(PropertyId.CONTENT_TYPE),
            response_topic=response_topic,
            correlation_data=props.get(PropertyId.CORRELATION_DATA),
            user_properties=props.get(PropertyId.USER_PROPERTY, ()),
        )

    def encode_forwarded(self) -> bytes:
        """Every property but the expiry (rewritten per delivery), no length prefix, in the
        order received for user properties (§3.3.2.3.7: the server keeps their order)."""
        items: list[tuple[PropertyId, Any]] = []
        if self.payload_format is not None:
            items.append((PropertyId.PAYLOAD_FORMAT_INDICATOR, self.payload_format))
        if self.content_type is not None:
            items.append((PropertyId.CONTENT_TYPE, self.content_type))
        if self.response_topic is not None:
            items.append((PropertyId.RESPONSE_TOPIC, self.response_topic))
        if self.correlation_data is not None:
            items.append((PropertyId.CORRELATION_DATA, self.correlation_data))
        items.extend((PropertyId.USER_PROPERTY, pair) for pair in self.user_properties)
        return b"".join(encode_property(prop, value) for prop, value in items)


NO_PROPERTIES = MessageProperties()


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    delay_s: int = 0  # MQTT 5 Will Delay Interval
    properties: MessageProperties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class Connect:
    level: ProtocolLevel
    client_id: str
    clean_start: bool
    keepalive_s: int
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    will: Will | None = None
    # MQTT 3.1.1 maps onto MQTT 5 here: clean_session=1 is 0, clean_session=0 is "never".
    session_expiry_s: int = 0
    receive_maximum: int = 65535
    maximum_packet_size: int | None = None
    authentication_method: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False
    packet_id: int = 0  # 0 for QoS 0, which has none
    properties: MessageProperties = NO_PROPERTIES


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    qos: int
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: RetainHandling = RetainHandling.SEND_ON_SUBSCRIBE


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    requests: tuple[tuple[str, SubscriptionOptions], ...]


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PacketIdAck:
    """PUBACK, PUBREC, PUBREL or PUBCOMP from the client."""

    kind: PacketType
    packet_id: int
    reason: int = 0


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: int = ReasonCode.SUCCESS
    session_expiry_s: int | None = None  # MQTT 5 may change it on the way out


Packet = Connect | Publish | Subscribe | Unsubscribe | PacketIdAck | PingReq | Disconnect
