"""The broker's state and rules, independent of sockets: admission, sessions and their takeover,
Wills, routing, retained messages and the per-session delivery queues.

Everything here runs on the broker's one event loop thread, so nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING

from skipfleet.minibroker.codes import (
    SUBACK_FAILURE_V311,
    ProtocolLevel,
    ReasonCode,
    RetainHandling,
)
from skipfleet.minibroker.config import BrokerConfig, BrokerStats, Counters
from skipfleet.minibroker.message import Delivery, Message
from skipfleet.minibroker.packets import (
    SESSION_NEVER_EXPIRES,
    Connect,
    SubscriptionOptions,
    Will,
)
from skipfleet.minibroker.router import RetainedStore, SubscriptionTree
from skipfleet.minibroker.sessions import QueueLimits, Session
from skipfleet.minibroker.topics import is_shared_filter, is_valid_filter

if TYPE_CHECKING:
    from skipfleet.minibroker.connection import ClientConnection

log = logging.getLogger("skipfleet.minibroker")

MAX_GRANTED_QOS = 1  # subscriptions are granted at most QoS 1: deliveries are QoS 0 or 1


class Broker:
    def __init__(self, config: BrokerConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.sessions: dict[str, Session] = {}
        self.subscriptions = SubscriptionTree()
        self.retained = RetainedStore()
        self.connections: set[ClientConnection] = set()
        self.counters = Counters()
        self._limits = QueueLimits(config.max_queued_messages, config.max_inflight_messages)

    def now(self) -> float:
        return self.loop.time()

    def stats(self) -> BrokerStats:
        return BrokerStats(
            connections_current=len(self.connections),
            sessions=len(self.sessions),
            subscriptions=len(self.subscriptions),
            retained_messages=len(self.retained),
            **vars(self.counters),
        )

    # ---- connecting ----------------------------------------------------------------------------

    def admit(self, connect: Connect) -> ReasonCode:
        """SUCCESS, or why CONNACK refuses this CONNECT."""
        if connect.authentication_method is not None:
            return ReasonCode.BAD_AUTHENTICATION_METHOD  # no MQTT 5 enhanced authentication
        if (
            not connect.client_id
            and not connect.clean_start
            and connect.level is ProtocolLevel.MQTT_3_1_1
        ):
            return ReasonCode.CLIENT_IDENTIFIER_NOT_VALID  # [MQTT-3.1.3-8] in 3.1.1
        return self._check_credentials(connect)

    def _check_credentials(self, connect: Connect) -> ReasonCode:
        users = self.config.users
        if users is None:
            return ReasonCode.SUCCESS
        if connect.username is None:
            return ReasonCode.NOT_AUTHORIZED  # anonymous, when accounts are required
        expected = users.get(connect.username)
        given = connect.password or b""
        if expected is None or not hmac.compare_digest(expected.encode(), given):
            return ReasonCode.BAD_USER_NAME_OR_PASSWORD
        return ReasonCode.SUCCESS

    @staticmethod
    def assign_client_id() -> str:
        return f"auto-{uuid.uuid4().hex}"

    def attach(
        self, connection: ClientConnection, connect: Connect, client_id: str
    ) -> tuple[Session, bool]:
        """The session for a new connection, and whether it existed (CONNACK session present).

        A connection already using this client id is taken over (§3.1.4-3). Its Will is
        published only if its session ends here (its session expiry was 0, or the new connection
        starts clean): if the session goes on, a new connection to it arrived before any Will
        delay ran out (§3.1.3.2.2). That is also what mosquitto 2.0 does.
        """
        session = self.sessions.get(client_id)
        present = False
        if session is not None:
            continues = not connect.clean_start and session.expiry_s > 0
            old_will = self._take_over(session)
            if continues:
                session.cancel_timers()
                session.delayed_will = None  # reconnected in time: the delayed Will is void
                present = True
            else:
                self.end_session(session)
                session = None
                if old_will is not None:
                    self.publish_will(old_will, client_id)
        if session is None:
            session = Session(client_id, self._limits)
            self.sessions[client_id] = session
        session.expiry_s = connect.session_expiry_s
        session.inflight_limit = min(self._limits.max_inflight, connect.receive_maximum)
        session.connection = connection
        return session, present

    def _take_over(self, session: Session) -> Will | None:
        old = session.connection
        if old is None:
            return None
        log.info("client %s connected again: closing its old connection", session.client_id)
        session.connection = None
        return old.close_for_takeover()

    def resume(self, session: Session) -> None:
        """After CONNACK: re-send what was in flight (DUP set), then what was queued."""
        connection = session.connection
        if connection is None:
            return
        now = self.now()
        for packet_id, delivery in list(session.inflight.items()):
            expired = delivery.message.is_expired(now)
            self.counters.messages_expired += expired
            if expired or not connection.send_publish(delivery, packet_id, dup=True):
                del session.inflight[packet_id]  # will never be acknowledged: free the slot
        self.pump(session)

    def detach(self, session: Session, will: Will | None) -> None:
        """The session's connection ended; `will` is its Will unless a DISCONNECT voided it."""
        session.connection = None
        if will is not None:
            if will.delay_s > 0 and session.expiry_s > 0:
                session.delayed_will = will
                session.will_timer = self.loop.call_later(
                    will.delay_s, self._publish_delayed_will, session
                )
            else:
                self.publish_will(will, session.client_id)
        if session.expiry_s == 0:
            self.end_session(session)
        elif session.expiry_s != SESSION_NEVER_EXPIRES:
            session.expiry_timer = self.loop.call_later(session.expiry_s, self.end_session, session)

    def end_session(self, session: Session) -> None:
        """Forget the session; a Will still waiting out its delay is published now (§3.1.2.5)."""
        session.cancel_timers()
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        for topic_filter in session.subscriptions:
            self.subscriptions.remove(topic_filter, session)
        session.subscriptions.clear()
        session.pending.clear()
        session.inflight.clear()
        will, session.delayed_will = session.delayed_will, None
        if will is not None:
            self.publish_will(will, session.client_id)

    def _publish_delayed_will(self, session: Session) -> None:
        session.will_timer = None
        will, session.delayed_will = session.delayed_will, None
        if will is not None:
            self.publish_will(will, session.client_id)

    def publish_will(self, will: Will, client_id: str) -> None:
        self.counters.wills_published += 1
        self.publish(Message.from_will(will, client_id, self.now()))

    @property
    def pending_wills(self) -> int:
        return sum(session.delayed_will is not None for session in self.sessions.values())

    # ---- routing -------------------------------------------------------------------------------

    def publish(self, message: Message) -> int:
        """Route a message to every matching session; returns how many sessions it went to."""
        if message.retain:
            self.retained.store(message)
        targets = self._targets(message)
        for session, (qos, retain_as_published) in targets.items():
            delivery = Delivery(
                message, min(message.qos, qos), message.retain and retain_as_published
            )
            self.deliver(session, delivery)
        return len(targets)

    def _targets(self, message: Message) -> dict[Session, tuple[int, bool]]:
        """One delivery per session even if several of its filters match (§3.3.4: at the
        highest of their QoS), skipping MQTT 5 no-local subscriptions of the publisher."""
        targets: dict[Session, tuple[int, bool]] = {}
        for session, options in self.subscriptions.match(message.topic):
            if options.no_local and session.client_id == message.publisher:
                continue
            previous = targets.get(session)
            if previous is None:
                targets[session] = (options.qos, options.retain_as_published)
            else:
                targets[session] = (
                    max(previous[0], options.qos),
                    previous[1] or options.retain_as_published,
                )
        return targets

    def deliver(self, session: Session, delivery: Delivery) -> None:
        connection = session.connection
        if connection is None:
            if delivery.qos:  # QoS 0 is not kept for offline clients (mosquitto's default too)
                self._enqueue(session, delivery)
            return
        if connection.writable and session.can_send_now(delivery):
            connection.send_delivery(delivery)
        else:
            self._enqueue(session, delivery)

    def _enqueue(self, session: Session, delivery: Delivery) -> None:
        dropped_before = session.dropped
        session.enqueue(delivery)
        self.counters.messages_dropped += session.dropped - dropped_before

    def pump(self, session: Session) -> None:
        """Send queued deliveries while the socket takes them and in-flight slots are free."""
        connection = session.connection
        while connection is not None and connection.writable:
            delivery = session.next_sendable()
            if delivery is None:
                return
            connection.send_delivery(delivery)

    # ---- subscriptions -------------------------------------------------------------------------

    def subscribe(
        self, session: Session, requests: tuple[tuple[str, SubscriptionOptions], ...], v5: bool
    ) -> tuple[list[int], list[tuple[str, SubscriptionOptions]]]:
        """SUBACK codes, and the (filter, options) whose retained messages go out after SUBACK."""
        codes: list[int] = []
        wants_retained: list[tuple[str, SubscriptionOptions]] = []
        for topic_filter, requested in requests:
            refusal = _refuse_filter(topic_filter, v5)
            if refusal is not None:
                codes.append(refusal)
                continue
            granted = replace(requested, qos=min(requested.qos, MAX_GRANTED_QOS))
            is_new = self.subscriptions.add(topic_filter, session, granted)
            session.subscriptions[topic_filter] = granted
            codes.append(granted.qos)
            if _sends_retained(granted.retain_handling, is_new):
                wants_retained.append((topic_filter, granted))
        return codes, wants_retained

    def send_retained(self, session: Session, topic_filter: str, options: SubscriptionOptions):
        for message in self.retained.matching(topic_filter, self.now()):
            # Retained messages keep the retain flag when sent because of a SUBSCRIBE (§3.3.1.3).
            self.deliver(session, Delivery(message, min(message.qos, options.qos), retain=True))

    def unsubscribe(self, session: Session, topic_filters: tuple[str, ...]) -> list[int]:
        codes = []
        for topic_filter in topic_filters:
            existed = self.subscriptions.remove(topic_filter, session)
            session.subscriptions.pop(topic_filter, None)
            codes.append(ReasonCode.SUCCESS if existed else ReasonCode.NO_SUBSCRIPTION_EXISTED)
        return codes


def _refuse_filter(topic_filter: str, v5: bool) -> int | None:
    if not is_valid_filter(topic_filter):
        return ReasonCode.TOPIC_FILTER_INVALID if v5 else SUBACK_FAILURE_V311
    if is_shared_filter(topic_filter):
        return ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if v5 else SUBACK_FAILURE_V311
    return None


def _sends_retained(handling: RetainHandling, is_new: bool) -> bool:
    if handling is RetainHandling.SEND_IF_NEW_SUBSCRIPTION:
        return is_new
    return handling is RetainHandling.SEND_ON_SUBSCRIBE
