"""Application messages as the broker routes and queues them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from skipfleet.minibroker.encoding import encode_topic
from skipfleet.minibroker.packets import NO_PROPERTIES, MessageProperties, Publish, Will


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: MessageProperties = NO_PROPERTIES
    publisher: str | None = None  # client id, for the MQTT 5 no-local option
    expires_at: float | None = None  # loop clock (monotonic), from the Message Expiry Interval
    # Encoded once per message, not once per subscriber:
    topic_bytes: bytes = field(init=False, repr=False)
    forwarded_properties: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "topic_bytes", encode_topic(self.topic))
        object.__setattr__(self, "forwarded_properties", self.properties.encode_forwarded())

    @classmethod
    def from_publish(cls, publish: Publish, publisher: str, now: float) -> Message:
        return cls(
            topic=publish.topic,
            payload=publish.payload,
            qos=publish.qos,
            retain=publish.retain,
            properties=publish.properties,
            publisher=publisher,
            expires_at=_expires_at(publish.properties, now),
        )

    @classmethod
    def from_will(cls, will: Will, publisher: str, now: float) -> Message:
        return cls(
            topic=will.topic,
            payload=will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=will.properties,
            publisher=publisher,
            expires_at=_expires_at(will.properties, now),
        )

    def remaining_expiry_s(self, now: float) -> int | None:
        """What is left of the Message Expiry Interval (§3.3.2.3.3: the received value minus the
        time spent waiting in the broker), in whole seconds rounded up; None if it never
        expires, 0 or less once expired."""
        if self.expires_at is None:
            return None
        return math.ceil(self.expires_at - now)

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _expires_at(properties: MessageProperties, now: float) -> float | None:
    return None if properties.expiry_s is None else now + properties.expiry_s


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message on its way to one session, at the QoS and retain flag it will be sent with."""

    message: Message
    qos: int
    retain: bool
