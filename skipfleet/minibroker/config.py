"""Broker settings and the counters it keeps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# 256 KiB: above the 128 KB publish limit the fleet chunks to, like our mosquitto configs.
DEFAULT_MAX_PACKET_SIZE = 256 * 1024


@dataclass(frozen=True)
class BrokerConfig:
    # Total bytes of one packet, fixed header included (mosquitto's max_packet_size); a client
    # sending more is disconnected (MQTT 5: DISCONNECT 0x95 first).
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    # None: anyone may connect. Otherwise {user name: password}; anything else is refused.
    users: Mapping[str, str] | None = None
    # Per session: messages waiting to be sent (also while a persistent client is offline).
    max_queued_messages: int = 1000
    # Per session: QoS 1 messages sent and not yet acknowledged (also capped by the client's
    # MQTT 5 Receive Maximum).
    max_inflight_messages: int = 100
    # A connection must send CONNECT this soon.
    connect_timeout_s: float = 10.0
    # Above this many bytes buffered for a client, messages wait in its session queue instead.
    write_buffer_limit: int = 64 * 1024

    def __post_init__(self) -> None:
        if not 64 <= self.max_packet_size <= 268_435_460:
            raise ValueError("max_packet_size must be within 64 B and 256 MB (MQTT's limit)")
        if self.max_queued_messages < 1 or not 1 <= self.max_inflight_messages <= 65535:
            raise ValueError("need max_queued_messages >= 1 and 1 <= max_inflight <= 65535")
        if self.connect_timeout_s <= 0 or self.write_buffer_limit < 1024:
            raise ValueError("need connect_timeout_s > 0 and write_buffer_limit >= 1024")
        if self.users is not None:
            object.__setattr__(self, "users", MappingProxyType(dict(self.users)))


class Counters:
    """Running totals, touched only on the broker's loop thread."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_refused = 0
        self.forced_disconnects = 0  # by the broker: bad packets, keep-alive, too large
        self.internal_errors = 0  # bugs caught at a connection's edge (should stay 0)
        self.messages_received = 0
        self.messages_sent = 0
        self.messages_dropped = 0
        self.messages_expired = 0
        self.wills_published = 0


@dataclass(frozen=True)
class BrokerStats:
    """A snapshot: the current sizes, then every Counters total."""

    connections_current: int
    sessions: int
    subscriptions: int
    retained_messages: int
    connections_total: int
    connections_refused: int
    forced_disconnects: int
    internal_errors: int
    messages_received: int
    messages_sent: int
    messages_dropped: int  # a full session queue, or over a client's maximum packet size
    messages_expired: int
    wills_published: int
