"""The MQTT bridge: the coordinator's only MQTT client (paho 2.x, callback API v2).

Inbound: paho's network thread only decodes, routes and reassembles chunks (InboundDecoder),
then hands messages to a queue (coordinator.inbox); a worker thread passes them to the fleet
state in batches (a second batch goes while the first is being committed) and another
acknowledges each to the broker (PUBACK, manual acks) only once the fleet state has committed
it, in order: a message is never lost between the broker and SQLite. The fleet state drops
repeats (coordinator.seen). Nothing slow ever runs in a callback.
Outbound: a control thread ticks the fleet state every tick_interval_s and publishes what its
durable outbox hands out (jobs with an expiry, adapters chunked under the publish limit, the
retained desired pointer); the broker's PUBACKs go back with the next tick, and only then are the
rows deleted (coordinator.delivery, coordinator.outbox). It applies the fleet's metrics every
metrics_interval_s. A connection without a session (the broker lost it: restarted before its
autosave) has the fleet state ask every open job again before the next tick (coordinator.reask).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Container
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.account_fight import AccountFightDetector, describe_fight, short_session_s
from coordinator.config import CoordinatorConfig
from coordinator.delivery import AckToken, InboundAcks, PublishTracker
from coordinator.inbox import Inbox, Item, Linger, events_in, is_heartbeat
from coordinator.ingest import Received
from coordinator.observations import MetricsReport, RejectReason
from coordinator.outbound import Outbound
from coordinator.ports import Committed, Committing, IngestPort, NotCommitted, Unavailable
from coordinator.reports import check_values
from shared.lean_client import LeanClient
from shared.mqtt import (
    MqttSettings,
    PublishTooLarge,
    backoff_delay,
    check_publish_size,
    connect_async,
    describe_refusal,
    logged,
    make_client,
    packed_publish_properties,
    report_connect_failures,
)
from shared.protocol import (
    DecodeError,
    ReassemblyError,
    Report,
    SenderReassemblers,
    check_route,
    decode,
    encode_for_publish,
    kind_of,
)
from shared.topics import Topics

log = logging.getLogger(__name__)

# CONNACK reason codes retrying cannot fix (MQTT 3.1.1 return codes 4 and 5 map to them).
REFUSED_FOR_GOOD = frozenset({0x86, 0x87})
# DISCONNECT "Session taken over": a client connected with our client id. Reconnecting would
# take it back, and the two would kick each other every few seconds, each time losing messages.
SESSION_TAKEN_OVER = 0x8E
MAX_BATCH = 256
# A batch smaller than this waits LINGER_S for more before it goes to the actor: each ingest
# call costs the driver and the actor about a millisecond whatever its size, and a busy fleet
# otherwise sends batches of a few messages (its acknowledgements wait that much longer).
LINGER_BELOW = 64
LINGER_S = 0.01
# A batch of heartbeats alone waits this long for more (cut to LINGER_S by any other message):
# a heartbeat is a state that only the next tick reads, and an idle fleet's heartbeats otherwise
# went one or two a call (1,000 devices: 22 ingest calls a second, ~0.9 ms of CPU each).
BEATS_LINGER_S = 0.2
# Past this many queued messages, a heartbeat (QoS 0, a state) waits beside the queue as its
# device's latest one, replacing (and counting as `overload`) an older one still waiting; other
# QoS 0 messages are dropped and counted. QoS 1 messages are always queued: the broker holds them
# back beyond RECEIVE_MAXIMUM unacknowledged ones. (10,000 devices connecting at once filled a
# bounded queue with heartbeats: the presences dropped behind them were never delivered again,
# and devices whose heartbeats were all dropped went stale.)
QUEUE_CAPACITY = 10_000
# A device's heartbeats queued at once: past this its newest waits beside the queue as above, so
# one device flooding heartbeats (up to 32 KiB each decoded, with a 4,096-wide signature) holds
# a few of them in memory, not QUEUE_CAPACITY (~330 MB), and other devices keep their place.
QUEUED_BEATS_PER_DEVICE = 4
# Unacknowledged device messages the broker may have in flight to us (MQTT v5 Receive Maximum):
# we acknowledge after the actor's commit, so mosquitto's default window of 20 would throttle us.
RECEIVE_MAXIMUM = 2_000
# Ingest batches on their way to the fleet state at once: while the actor commits one, the next
# is already pickled and queued behind it, so the actor does not wait for the driver between
# batches (nor the driver for the actor). Each is acknowledged once it is committed, in order.
INGEST_IN_FLIGHT = 2
# Outbox rows paho may hold beyond its publishes in flight (waiting for room in the broker's
# window, or for a connection), plus one row's chunks; the rest wait in the driver as rows, a
# few hundred bytes each where a pointer's publish carries its adapter (~12 KB). (A promotion
# handed paho 10,000 pointers at once: ~120 MB of payloads in the driver, sent over seconds.)
# PUBACKs free room: those that bring the count under half of this have the rows handed over
# (by a tick, or between the retries while the fleet state is away).
OUTBOUND_HELD_MAX = 1_000
# Ticks follow events: a committed batch of device messages, an operator's request, or a tick
# that handed out work asks for the next tick at once, but ticks start at least this far apart
# (a burst of batches shares one tick, and an event after a quiet spell is not delayed); with
# nothing happening the fleet is ticked every tick_interval_s.
EVENT_TICK_GAP_S = 0.05


class FatalReason(StrEnum):
    """Why the bridge gave up for good (the CLI exits with a code for each)."""

    BROKER_REFUSED = "broker_refused"
    SESSION_TAKEN_OVER = "session_taken_over"
    SUBSCRIPTION_REFUSED = "subscription_refused"  # e.g. no shared subscriptions on the broker
    # Another client on our account kicks us at once after every connect (account_fight).
    ACCOUNT_SHARED = "account_shared"


class BridgeMetrics(Protocol):
    """What the bridge counts: coordinator.metrics.FleetMetrics in the driver, or a partition
    actor's relay to the driver (coordinator.partition_runtime)."""

    def message_received(self, kind: str, size: int) -> None: ...

    def message_sent(self, kind: str) -> None: ...

    def message_rejected(self, reason: str) -> None: ...

    def apply(self, report: MetricsReport) -> None: ...

    @property
    def refreshes_on_scrape(self) -> bool:
        """Makes its own snapshots when read: the bridge asks for events only."""
        ...


class InboundDecoder:
    """bytes on a topic -> a Received, or None (a chunk still waiting, or a counted rejection).

    Runs on paho's network thread only (the reassemblers are not shared). Repeats pass: the
    fleet state drops them in the same transaction that would apply them (coordinator.seen).
    """

    def __init__(
        self,
        topics: Topics,
        metrics: BridgeMetrics,
        *,
        publish_limit: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._topics = topics
        self._metrics = metrics
        self._publish_limit = publish_limit
        self._clock = clock
        self._reassembler = SenderReassemblers()  # a device evicts only its own

    def decode(self, topic: str, payload: bytes | bytearray) -> Received | None:
        try:
            device, kind = self._topics.parse(topic)
        except ValueError:
            self._rejected(RejectReason.BAD_TOPIC, f"topic {topic!r}")
            return None
        if not kind.from_device:
            self._rejected(RejectReason.BAD_TOPIC, f"a command topic {topic!r}")
            return None
        self._metrics.message_received(kind.value, len(payload))
        if len(payload) > self._publish_limit:
            self._rejected(RejectReason.OVERSIZED, f"{len(payload)} bytes on {topic}")
            return None
        try:
            envelope = decode(payload, max_bytes=self._publish_limit)
        except DecodeError as err:
            self._rejected(RejectReason.MALFORMED, f"{topic}: {err}")
            return None
        try:
            check_route(device, kind, envelope)
        except DecodeError as err:
            self._rejected(RejectReason.WRONG_ROUTE, f"{topic}: {err}")
            return None
        try:
            whole = self._reassembler.feed(envelope)
        except ReassemblyError as err:
            self._rejected(RejectReason.REASSEMBLY, f"{topic}: {err}")
            return None
        except DecodeError as err:
            self._rejected(RejectReason.MALFORMED, f"{topic} (reassembled): {err}")
            return None
        if whole is None:
            return None
        return Received(whole, self._clock())

    def _rejected(self, reason: RejectReason, detail: str) -> None:
        log.debug("dropping an inbound message (%s): %s", reason.value, detail)
        self._metrics.message_rejected(reason.value)


def lean_client(settings: MqttSettings, client_id: str, *, manual_ack: bool) -> paho.Client:
    """The bridge's paho client: a LeanClient (shared.lean_client), since the bridge reads no
    inbound message's MQTT v5 properties (the envelope in the payload carries everything)."""
    return make_client(settings, client_id, manual_ack=manual_ack, lean=True)


class MqttBridge:
    def __init__(
        self,
        config: CoordinatorConfig,
        port: IngestPort,
        metrics: BridgeMetrics,
        *,
        on_fatal: Callable[[FatalReason, str], None] = lambda kind, reason: None,
        client_factory: Callable[..., paho.Client] = lean_client,
    ) -> None:
        self._config = config
        self._port = port
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._topics = Topics(config.topic_root)
        # A whole report may arrive as one publish of up to twice the chunk limit (as the agent
        # accepts on its side); chunks are re-assembled into at most 16 MiB.
        self._decoder = InboundDecoder(self._topics, metrics, publish_limit=2 * config.chunk_limit)
        self._inbox = Inbox(Linger(LINGER_BELOW, LINGER_S, BEATS_LINGER_S))
        self._latest_beats: dict[str, tuple[Received, AckToken]] = {}  # device -> newest held
        self._queued_beats: dict[str, int] = {}  # device -> its heartbeats in the queue
        self._beats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # device messages committed: tick soon
        self._connected = threading.Event()
        self._session_lost = threading.Event()  # set on paho's thread, handled by the ticks
        # Derived from the state dir's resolved path: read once, not on every publish.
        self._client_id = config.client_id
        self._client = client_factory(config.mqtt, self._client_id, manual_ack=True)
        many = self._client.ack_many if isinstance(self._client, LeanClient) else None
        self._acks = InboundAcks(self._client.ack, many)
        self._published = PublishTracker()
        self._unpublished: list[Outbound] = []  # handed out, but paho would not take them yet
        self._settled: list[int] = []  # acknowledged outbox rows the actor has not heard of
        report_connect_failures(self._client, config.mqtt, log)  # refused, TLS: why, what to do
        self._fight = AccountFightDetector(short_session_s(config.mqtt.reconnect_min_delay_s))
        failed = self._client.on_connect_fail
        self._client.on_connect_fail = _also(failed, self._fight.attempt_failed)
        self._client.on_connect = logged(self._handle_connect)
        self._client.on_disconnect = logged(self._handle_disconnect)
        self._client.on_message = logged(self._handle_message)
        self._client.on_publish = logged(self._handle_publish)
        self._client.on_subscribe = logged(self._handle_subscribe)
        self._in_flight = threading.Semaphore(INGEST_IN_FLIGHT)  # batches not committed yet
        self._abandoned = threading.Event()  # a batch left unacknowledged at a stop
        self._submitted: queue.Queue[_Submitted | None] = queue.Queue()  # in order, to settle
        self._threads = [
            threading.Thread(target=self._forward_inbound, name="bridge-inbound", daemon=True),
            threading.Thread(target=self._settle_inbound, name="bridge-settle", daemon=True),
            threading.Thread(target=self._control_loop, name="bridge-control", daemon=True),
        ]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wake(self) -> None:
        """The fleet state changed outside the bridge (an operator's request): tick soon, so
        what it put in the outbox goes out now, not a tick interval later."""
        self._wake.set()

    def start(self) -> None:
        connect_async(self._client, self._config.mqtt, receive_maximum=RECEIVE_MAXIMUM)
        self._client.loop_start()
        for thread in self._threads:
            thread.start()
        log.info("bridge connecting to %s as %s", self._config.mqtt.url, self._config.client_id)

    def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Stops ticking, disconnects, then commits what was received. Those messages cannot
        be acknowledged any more: a persistent session delivers them again to the next
        coordinator, which drops the repeats. Outbox rows not acknowledged stay in the outbox."""
        self._stopping.set()
        self._wake.set()
        self._client.disconnect()
        self._client.loop_stop()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(flush_timeout_s)
        waiting = [*self._inbox.take(QUEUE_CAPACITY + RECEIVE_MAXIMUM), *self._take_beats(None)]
        remaining = [r for r, _ in waiting if r]
        try:
            if remaining:
                self._port.ingest(remaining)
        except Unavailable as err:
            log.warning("%d received messages not committed (%s)", len(remaining), err)

    def publish(self, outbound: Outbound) -> bool:
        """Hands one outbox row to paho (all its chunks); False if paho would not take it now.
        A row paho already holds from an earlier hand-out is not published twice."""
        if outbound.seq is not None and self._published.holds(outbound.seq):
            return True
        kind = outbound.topic_kind
        topic = self._topics.topic(outbound.device_id, kind)
        headers = {} if outbound.message_id is None else {"message_id": outbound.message_id}
        items = encode_for_publish(
            outbound.message, sender=self._client_id, limit=self._config.chunk_limit,
            **headers,
        )  # fmt: skip
        mids = []
        for item in items:
            try:
                check_publish_size(item.payload, self._config.chunk_limit)
            except PublishTooLarge as err:
                log.error("not publishing %s to %s, ever: %s", kind.value, topic, err)
                self._settle_now(outbound)
                return True
            info = self._client.publish(
                topic,
                item.payload,
                qos=kind.qos,
                retain=kind.retained,
                properties=packed_publish_properties(item.envelope),
            )
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                log.warning("publish to %s not taken: %s", topic, paho.error_string(info.rc))
                return False  # the whole row again later (the device drops repeated chunks)
            mids.append(info.mid)
            # Counted when handed to paho, which queues QoS 1 publishes while disconnected.
            self._metrics.message_sent(kind_of(outbound.message).value)
        if outbound.seq is not None:
            self._published.published(outbound.seq, mids)
        return True

    def _held_by_paho(self) -> int:
        """Publishes paho holds and has not sent (LeanClient counts them; paho's own Client
        not: unbounded)."""
        return self._client.held_beyond_flight() if isinstance(self._client, LeanClient) else 0

    def _room_for_held(self) -> bool:
        """paho holds at most half OUTBOUND_HELD_MAX: room to hand rows held back over."""
        return self._held_by_paho() <= OUTBOUND_HELD_MAX // 2

    def _settle_now(self, outbound: Outbound) -> None:
        if outbound.seq is not None:
            self._settled.append(outbound.seq)

    # ---- paho callbacks (network thread: quick, never blocking)

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._fight.attempt_failed()
            message = describe_refusal(reason_code, self._config.mqtt)
            log.error("%s", message)
            if reason_code.value in REFUSED_FOR_GOOD:
                self._on_fatal(FatalReason.BROKER_REFUSED, message)
            return
        self._fight.accepted()
        self._acks.connected()
        if isinstance(client, LeanClient):
            client.adopt_receive_maximum(properties)
        client.subscribe(self._topics.coordinator_subscriptions(self._config.share_group))
        self._connected.set()
        log.info("connected to %s (session present: %s)", self._config.mqtt.url,
                 flags.session_present)  # fmt: skip
        if not flags.session_present:
            self._session_lost.set()
            self._wake.set()

    def _handle_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if not refused:
            return
        message = f"{self._config.mqtt.url} refused a subscription: {', '.join(refused)}"
        log.error("%s", message)
        if self._config.share_group is not None:  # a partition deaf to its share of the fleet
            self._on_fatal(
                FatalReason.SUBSCRIPTION_REFUSED,
                f"{message}. A partitioned coordinator needs MQTT 5 shared subscriptions "
                f"($share/...) on the broker, and an ACL that lets it read them",
            )

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        if self._stopping.is_set():
            return
        log.warning("disconnected from %s: %s", self._config.mqtt.url, reason_code)
        if reason_code.value == SESSION_TAKEN_OVER:
            client.disconnect()  # no automatic reconnect: never take the session back
            self._on_fatal(
                FatalReason.SESSION_TAKEN_OVER,
                f"another MQTT client connected to {self._config.mqtt.url} with this "
                f"coordinator's client id {self._config.client_id!r} (a second coordinator of "
                f"instance {self._config.instance_name!r}?): stopping rather than fighting over "
                f"the session. Give each coordinator its own --instance (and broker account)",
            )
            return
        fight = self._fight.closed(disconnect_from_broker=flags.is_disconnect_packet_from_server)
        if fight is not None:
            # Not disconnect(): after a lost connection paho overwrites the state it sets and
            # reconnects. From its own thread, loop_stop() only ends the loop, without a join.
            client.loop_stop()
            mqtt = self._config.mqtt
            message = describe_fight(fight, mqtt.username, self._client_id, mqtt.url)
            self._on_fatal(FatalReason.ACCOUNT_SHARED, message)

    def _handle_message(
        self, client: paho.Client, userdata: object, message: paho.MQTTMessage
    ) -> None:
        token = self._acks.token(message.mid, message.qos)
        received = self._decoder.decode(message.topic, message.payload)
        if message.qos == 0 and not self._may_queue(received):
            self._hold_or_drop(received, token, message.topic)
            return
        # A rejected message or a chunk is acknowledged through the queue too, in order, after
        # the messages before it (the worker never blocks this thread).
        self._inbox.put((received, token))

    def _may_queue(self, received: Received | None) -> bool:
        """A QoS 0 message may join the queue (and is counted there if it is a heartbeat)."""
        if len(self._inbox) >= QUEUE_CAPACITY:
            return False
        if is_heartbeat(received):
            with self._beats_lock:
                queued = self._queued_beats.get(received.device_id, 0)
                if queued >= QUEUED_BEATS_PER_DEVICE:
                    return False
                self._queued_beats[received.device_id] = queued + 1
        return True

    def _dequeued(self, items: list[Item]) -> None:
        with self._beats_lock:
            for received, _ in items:
                if is_heartbeat(received):
                    left = self._queued_beats.pop(received.device_id, 0) - 1
                    if left > 0:
                        self._queued_beats[received.device_id] = left

    def _hold_or_drop(self, received: Received | None, token: AckToken, topic: str) -> None:
        if is_heartbeat(received):
            with self._beats_lock:
                replaced = self._latest_beats.pop(received.device_id, None)
                self._latest_beats[received.device_id] = (received, token)
            if replaced is None:
                return
        else:
            log.error("inbound queue full: dropped a QoS 0 message on %s", topic)
        self._metrics.message_rejected(RejectReason.OVERLOAD.value)

    def _handle_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:  # refused (e.g. the ACL): it will never be delivered
            log.error("the broker refused publish %d: %s", mid, reason_code)
        self._published.on_puback(mid)
        if self._unpublished and self._room_for_held():
            self._wake.set()  # room for the rows held back: the control thread hands them over

    # ---- worker threads

    def _forward_inbound(self) -> None:
        """Hands batches to the fleet state, up to INGEST_IN_FLIGHT not yet committed; the
        settling thread waits for each in order and acknowledges it. A batch that could not
        even be handed over holds back the next until it is settled: nothing overtakes it."""
        while not self._stopping.is_set():
            if not self._in_flight.acquire(timeout=0.2):
                continue
            items = self._next_batch()
            if not items:
                self._in_flight.release()
                continue
            submitted = self._submit(items)
            self._submitted.put(submitted)
            if submitted.refused:
                while not submitted.settled.wait(0.2) and not self._stopping.is_set():
                    pass
        self._submitted.put(None)  # after the last batch: the settling thread ends

    def _settle_inbound(self) -> None:
        while (submitted := self._submitted.get()) is not None:
            try:
                self._settle(submitted)
            finally:
                submitted.settled.set()
                self._in_flight.release()

    def _next_batch(self) -> list[Item]:
        """Up to MAX_BATCH queued messages, the first waited for a moment; a small batch
        lingers (Inbox.next_batch), then held heartbeats are added after the queue's."""
        first_wait_s = 0.05 if self._latest_beats else 0.2
        items = self._inbox.next_batch(first_wait_s, MAX_BATCH, self._stopping.is_set)
        self._dequeued(items)
        items += self._take_beats(MAX_BATCH // 4)  # held heartbeats: after the queue's
        return items

    def _submit(self, items: list[Item]) -> _Submitted:
        batch = [_checked(received) for received, _ in items if received is not None]
        committing = self._hand_over(batch) if batch else Committed()
        return _Submitted(items, batch, committing, refused=isinstance(committing, NotCommitted))

    def _hand_over(self, batch: list[Received]) -> Committing:
        try:
            return self._port.submit_ingest(batch)
        except Exception as err:  # a bug here must not end this thread (nothing would be acked)
            log.exception("could not hand a batch to the fleet state")
            return NotCommitted(Unavailable(f"{type(err).__name__}: {err}"))

    def _settle(self, submitted: _Submitted) -> None:
        """Waits until the batch is committed in the fleet state, then acknowledges it. While
        the fleet state is unavailable (or the wait fails otherwise) it submits the batch again
        after a backoff (nothing is acknowledged, so the broker holds back the rest); applying
        it twice changes nothing (coordinator.seen). A batch submitted again after a failed
        actor call (its actor gone, or no answer in 30 s) can land after the one submitted
        behind it; one that could not be handed over at all holds the next back (above).
        Once a batch is left unacknowledged at a stop, none after it is acknowledged."""
        if self._abandoned.is_set():
            return
        committing, attempt = submitted.committing, 0
        while True:
            try:
                committing.wait()
                break
            except Exception as err:
                if self._stopping.is_set():
                    self._abandoned.set()  # delivered again to the next coordinator, in order
                    return
                if isinstance(err, Unavailable):
                    log.warning("fleet state unavailable (%s); retrying", err)
                else:
                    log.exception("committing a batch failed; retrying")
                self._stopping.wait(backoff_delay(attempt, base_s=0.5, cap_s=10.0))
                attempt = min(attempt + 1, 6)
                committing = self._hand_over(submitted.batch)
        self._acks.ack(token for _, token in submitted.items)
        if events_in(submitted.items):  # heartbeats alone wait for the next tick: it reads them
            self._wake.set()

    def _take_beats(self, limit: int | None) -> list[tuple[Received, AckToken]]:
        """Up to `limit` held heartbeats (all with None), oldest held first."""
        with self._beats_lock:
            devices = list(self._latest_beats)[:limit]
            return [self._latest_beats.pop(device) for device in devices]

    def _control_loop(self) -> None:
        next_metrics = 0.0
        failures = 0
        busy = False
        last_tick = float("-inf")
        while not self._stopping.is_set():
            self._wait_for_tick(busy, failures, last_tick)
            if self._stopping.is_set():
                return
            last_tick = time.monotonic()
            try:
                busy = self._publish_handed_out()
                if time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + self._config.metrics_interval_s
                    snapshot = not self._metrics.refreshes_on_scrape
                    self._metrics.apply(self._port.metrics_report(snapshot))
                failures = 0
            except Unavailable as err:
                failures = min(failures + 1, 6)
                log.warning("tick skipped: %s", err)
            except Exception:
                failures = min(failures + 1, 6)
                log.exception("tick failed")

    def _wait_for_tick(self, busy: bool, failures: int, last_tick: float) -> None:
        """Until the next tick: after an event (or a busy tick) at once, but no sooner than
        EVENT_TICK_GAP_S after the last tick started; the tick interval when idle; a backoff
        after failures."""
        if failures:
            self._publish_held_until(time.monotonic() + backoff_delay(failures))
            return
        if busy or self._wake.wait(self._config.tick_interval_s):
            self._stopping.wait(max(0.0, last_tick + EVENT_TICK_GAP_S - time.monotonic()))
        self._wake.clear()

    def _publish_held_until(self, deadline: float) -> None:
        """Waits out a backoff from the fleet state; meanwhile the rows held back go to paho
        as PUBACKs make room for them, which needs no fleet state (at most once every
        EVENT_TICK_GAP_S, as ticks)."""
        while not self._stopping.is_set() and (left := deadline - time.monotonic()) > 0:
            if not self._wake.wait(left) or self._stopping.wait(EVENT_TICK_GAP_S):
                continue
            self._wake.clear()
            try:
                if self._to_paho([]):  # room freed while it ran: no PUBACK will ask again
                    self._wake.set()
            except Exception:
                log.exception("handing the rows held back to paho failed")

    def _publish_handed_out(self) -> bool:
        """One tick; True if it handed out messages (more work is likely to follow soon)."""
        self._to_paho([])  # the rows held back first, whether the fleet state answers or not
        self._reask_if_session_lost()
        self._settled.extend(self._published.settled())
        acknowledged = list(self._settled)
        handed_out = self._port.tick(acknowledged)
        del self._settled[: len(acknowledged)]  # the actor has them (tick raised otherwise)
        return self._to_paho(handed_out)

    def _to_paho(self, handed_out: list[Outbound]) -> bool:
        """The rows held back, then `handed_out`, to paho in order while it has room; True if
        more is likely to follow soon. A row held back or held by paho is not added again: a
        restarted actor hands out again every row not acknowledged."""
        held = {o.seq for o in self._unpublished if o.seq is not None} if handed_out else set()
        fresh = [o for o in handed_out if not self._holds(o, held)]
        waiting, self._unpublished = _in_order(self._unpublished, fresh), []
        index = 0
        try:
            with self._publishing_many():
                for index, outbound in enumerate(waiting):
                    if self._held_by_paho() >= OUTBOUND_HELD_MAX:
                        self._unpublished = waiting[index:]
                        # A PUBACK that frees room asks for a tick; room freed before the line
                        # above asked for none.
                        return bool(handed_out) or self._room_for_held()
                    if not self.publish(outbound):
                        self._unpublished = waiting[index:]  # in order, from this one, next tick
                        return True
        except Exception:
            # The rows after the one that raised wait as before; that one stays in the outbox
            # for the actor's next start, as a row whose message cannot be built.
            self._unpublished = waiting[index + 1 :]
            raise
        return bool(handed_out)

    def _holds(self, outbound: Outbound, held_back: Container[int]) -> bool:
        seq = outbound.seq
        return seq is not None and (seq in held_back or self._published.holds(seq))

    def _publishing_many(self) -> AbstractContextManager[None]:
        if isinstance(self._client, LeanClient):
            return self._client.publishing_many()
        return nullcontext()

    def _reask_if_session_lost(self) -> None:
        """After a connection without a session: the open jobs' commands into the outbox, so
        this tick hands them out. If the fleet state does not answer, asked at the next tick."""
        if not self._session_lost.is_set():
            return
        self._session_lost.clear()  # before asking: a later reconnect sets it again
        try:
            asked = self._port.reask_open_jobs()
        except BaseException:
            self._session_lost.set()
            raise
        log.info("no MQTT session on the broker: %d open jobs asked again", asked)


@dataclass(frozen=True)
class _Submitted:
    """A batch handed to the fleet state and not acknowledged yet."""

    items: list[Item]  # what the broker is owed an ack for
    batch: list[Received]  # the decoded messages among them
    committing: Committing
    refused: bool = False  # not even handed over: nothing goes after it until it is settled
    settled: threading.Event = field(default_factory=threading.Event)


def _in_order(held_back: list[Outbound], fresh: list[Outbound]) -> list[Outbound]:
    """Both lists are in outbox order; a restarted actor's hand-out can hold rows older than
    those held back (a retained pointer published after a newer one would replace it)."""
    if held_back and fresh and (fresh[0].seq or 0) < (held_back[-1].seq or 0):
        return sorted([*held_back, *fresh], key=lambda o: o.seq or 0)
    return [*held_back, *fresh]


def _checked(received: Received) -> Received:
    """A report with its checks' verdict (coordinator.reports.check_values), made here on the
    inbound worker thread: beside the fleet actor, and off paho's network thread (a report
    chooses its own shapes, so its check can be slow)."""
    message = received.envelope.message
    if received.checked is not None or not isinstance(message, Report):
        return received
    verdict = check_values(received.device_id, message.adapter, message.metrics.samples)
    return replace(received, checked=verdict)


def _also(first: Callable[..., None] | None, then: Callable[[], None]) -> Callable[..., None]:
    """A paho callback that runs `first` (if any) with paho's arguments, then `then()`."""

    def both(*args: object) -> None:
        if first is not None:
            first(*args)
        then()

    return both
