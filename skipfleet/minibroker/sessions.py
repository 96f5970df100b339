"""Server-side session state (§4.1): what outlives a connection when the session is persistent.

A session holds the client's subscriptions, the messages waiting to be sent (bounded), the QoS 1
messages sent and not yet acknowledged, and the inbound QoS 2 packet ids awaiting PUBREL.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skipfleet.minibroker.message import Delivery
from skipfleet.minibroker.packets import SubscriptionOptions, Will

if TYPE_CHECKING:
    from skipfleet.minibroker.connection import ClientConnection


@dataclass(frozen=True, slots=True)
class QueueLimits:
    max_queued: int  # messages waiting per session, online or not
    max_inflight: int  # QoS 1 messages sent and not yet acknowledged, per session


class Session:
    def __init__(self, client_id: str, limits: QueueLimits) -> None:
        self.client_id = client_id
        self.limits = limits
        self.subscriptions: dict[str, SubscriptionOptions] = {}
        self.pending: deque[Delivery] = deque()
        self.inflight: dict[int, Delivery] = {}  # packet id -> delivery, in sending order
        self.awaiting_pubrel: set[int] = set()
        self.expiry_s = 0
        self.inflight_limit = limits.max_inflight
        self.connection: ClientConnection | None = None
        self.dropped = 0
        # A Will waiting out its MQTT 5 delay after the connection was lost.
        self.delayed_will: Will | None = None
        self.will_timer: asyncio.TimerHandle | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self._next_packet_id = 1
        self._queued_qos0 = 0

    def __repr__(self) -> str:
        return f"Session({self.client_id!r}, online={self.connection is not None})"

    # ---- the outgoing queue ---------------------------------------------------------------------

    def enqueue(self, delivery: Delivery) -> bool:
        """Queue a delivery; False if it was dropped because the queue is full.

        A full queue gives up QoS 0 first: a new QoS 0 message is dropped, a new QoS 1 message
        replaces the oldest queued QoS 0 one, and only a queue full of QoS 1 drops QoS 1.
        """
        full = len(self.pending) >= self.limits.max_queued
        if full and (delivery.qos == 0 or not self._drop_oldest_qos0()):
            self.dropped += 1
            return False
        self.pending.append(delivery)
        self._queued_qos0 += delivery.qos == 0
        return True

    def _drop_oldest_qos0(self) -> bool:
        if not self._queued_qos0:
            return False
        for index, queued in enumerate(self.pending):
            if queued.qos == 0:
                del self.pending[index]
                self._queued_qos0 -= 1
                self.dropped += 1
                return True
        return False

    def next_sendable(self) -> Delivery | None:
        """Take the head of the queue if it may go now (QoS 1 needs a free in-flight slot)."""
        if not self.pending:
            return None
        head = self.pending[0]
        if head.qos and len(self.inflight) >= self.inflight_limit:
            return None
        self.pending.popleft()
        self._queued_qos0 -= head.qos == 0
        return head

    def can_send_now(self, delivery: Delivery) -> bool:
        """True if `delivery` may skip the queue: nothing waits before it and QoS allows."""
        return not self.pending and (delivery.qos == 0 or len(self.inflight) < self.inflight_limit)

    # ---- QoS 1 in flight -----------------------------------------------------------------------

    def start_inflight(self, delivery: Delivery) -> int:
        packet_id = self._allocate_packet_id()
        self.inflight[packet_id] = delivery
        return packet_id

    def acknowledge(self, packet_id: int) -> bool:
        return self.inflight.pop(packet_id, None) is not None

    def _allocate_packet_id(self) -> int:
        # Ids in flight stay reserved until acknowledged; the limit keeps a free one available.
        while True:
            packet_id = self._next_packet_id
            self._next_packet_id = packet_id % 0xFFFF + 1
            if packet_id not in self.inflight:
                return packet_id

    # ---- timers --------------------------------------------------------------------------------

    def cancel_timers(self) -> None:
        for timer in (self.will_timer, self.expiry_timer):
            if timer is not None:
                timer.cancel()
        self.will_timer = self.expiry_timer = None
