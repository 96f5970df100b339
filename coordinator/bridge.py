"""The MQTT bridge: the coordinator's only MQTT client (paho 2.x, callback API v2).

Inbound: paho's network thread only decodes, routes, reassembles chunks and drops duplicates
(InboundDecoder), then hands messages to a queue; a worker thread passes them to the fleet state
in batches (fire-and-forget through the port). Nothing slow ever runs in a callback.
Outbound: a control thread ticks the fleet state every tick_interval_s and publishes what it
returns (jobs with an expiry, adapters chunked under the publish limit, the retained desired
pointer), and applies the fleet's metrics every metrics_interval_s.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

import paho.mqtt.client as paho

from coordinator.config import CoordinatorConfig
from coordinator.ingest import Received
from coordinator.metrics import FleetMetrics
from coordinator.outbound import Outbound
from coordinator.ports import FleetPort, Unavailable
from shared.mqtt import (
    PublishTooLarge,
    backoff_delay,
    check_publish_size,
    connect_async,
    logged,
    make_client,
    publish_properties,
)
from shared.protocol import (
    DecodeError,
    ReassemblyError,
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
QUEUE_CAPACITY = 10_000


class FatalReason(StrEnum):
    """Why the bridge gave up for good (the CLI exits with a code for each)."""

    BROKER_REFUSED = "broker_refused"
    SESSION_TAKEN_OVER = "session_taken_over"


class RejectReason(StrEnum):
    """Why the bridge dropped an inbound message (the `reason` label)."""

    BAD_TOPIC = "bad_topic"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    WRONG_ROUTE = "wrong_route"
    REASSEMBLY = "reassembly"
    DUPLICATE = "duplicate"
    OVERLOAD = "overload"


class Deduplicator:
    """Remembers the last `capacity` idempotency keys: (device, boot id, seq) or a message id."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[tuple, None] = OrderedDict()

    def seen(self, key: tuple) -> bool:
        """True if the key was seen before; remembers it otherwise."""
        if key in self._seen:
            return True
        self._seen[key] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return False


class InboundDecoder:
    """bytes on a topic -> a Received, or None (a chunk still waiting, or a counted rejection).

    Runs on paho's network thread only (the reassemblers and Deduplicator are not shared).
    """

    def __init__(
        self,
        topics: Topics,
        metrics: FleetMetrics,
        *,
        publish_limit: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._topics = topics
        self._metrics = metrics
        self._publish_limit = publish_limit
        self._clock = clock
        self._reassembler = SenderReassemblers()  # a device evicts only its own
        self._dedup = Deduplicator()

    def decode(self, topic: str, payload: bytes) -> Received | None:
        try:
            device, kind = self._topics.parse(topic)
        except ValueError:
            return self._rejected(RejectReason.BAD_TOPIC, f"topic {topic!r}")
        if not kind.from_device:
            return self._rejected(RejectReason.BAD_TOPIC, f"a command topic {topic!r}")
        self._metrics.message_received(kind.value, len(payload))
        if len(payload) > self._publish_limit:
            return self._rejected(RejectReason.OVERSIZED, f"{len(payload)} bytes on {topic}")
        try:
            envelope = decode(payload, max_bytes=self._publish_limit)
        except DecodeError as err:
            return self._rejected(RejectReason.MALFORMED, f"{topic}: {err}")
        try:
            check_route(device, kind, envelope)
        except DecodeError as err:
            return self._rejected(RejectReason.WRONG_ROUTE, f"{topic}: {err}")
        try:
            whole = self._reassembler.feed(envelope)
        except ReassemblyError as err:
            return self._rejected(RejectReason.REASSEMBLY, f"{topic}: {err}")
        except DecodeError as err:
            return self._rejected(RejectReason.MALFORMED, f"{topic} (reassembled): {err}")
        if whole is None:
            return None
        key = whole.dedup_key or ("id", whole.message_id)
        if self._dedup.seen(key):
            return self._rejected(RejectReason.DUPLICATE, f"{whole.kind} {key} from {device}")
        return Received(whole, self._clock())

    def _rejected(self, reason: RejectReason, detail: str) -> None:
        log.debug("dropping an inbound message (%s): %s", reason.value, detail)
        self._metrics.message_rejected(reason.value)
        return None


class MqttBridge:
    def __init__(
        self,
        config: CoordinatorConfig,
        port: FleetPort,
        metrics: FleetMetrics,
        *,
        on_fatal: Callable[[FatalReason, str], None] = lambda kind, reason: None,
        client_factory: Callable[..., paho.Client] = make_client,
    ) -> None:
        self._config = config
        self._port = port
        self._metrics = metrics
        self._on_fatal = on_fatal
        self._topics = Topics(config.topic_root)
        # A whole report may arrive as one publish of up to twice the chunk limit (as the agent
        # accepts on its side); chunks are re-assembled into at most 16 MiB.
        self._decoder = InboundDecoder(self._topics, metrics, publish_limit=2 * config.chunk_limit)
        self._inbox: queue.Queue[Received] = queue.Queue(QUEUE_CAPACITY)
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._client = client_factory(config.mqtt, config.client_id)
        self._client.on_connect = logged(self._handle_connect)
        self._client.on_disconnect = logged(self._handle_disconnect)
        self._client.on_message = logged(self._handle_message)
        self._threads = [
            threading.Thread(target=self._forward_inbound, name="bridge-inbound", daemon=True),
            threading.Thread(target=self._control_loop, name="bridge-control", daemon=True),
        ]

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        connect_async(self._client, self._config.mqtt)
        self._client.loop_start()
        for thread in self._threads:
            thread.start()
        log.info("bridge connecting to %s as %s", self._config.mqtt.url, self._config.client_id)

    def stop(self, flush_timeout_s: float = 10.0) -> None:
        """Stops ticking, disconnects, then hands the last received messages to the fleet."""
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(flush_timeout_s)
        self._forward_remaining()
        self._port.flush(flush_timeout_s)

    def publish(self, outbound: Outbound) -> None:
        kind = outbound.topic_kind
        topic = self._topics.topic(outbound.device_id, kind)
        items = encode_for_publish(
            outbound.message, sender=self._config.client_id, limit=self._config.chunk_limit
        )
        for item in items:
            try:
                check_publish_size(item.payload, self._config.chunk_limit)
            except PublishTooLarge as err:
                log.error("not publishing %s to %s: %s", kind.value, topic, err)
                return
            info = self._client.publish(
                topic,
                item.payload,
                qos=kind.qos,
                retain=kind.retained,
                properties=publish_properties(item.envelope),
            )
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                log.error("publish to %s failed: %s", topic, paho.error_string(info.rc))
                return
            # Counted when handed to paho, which queues QoS 1 publishes while disconnected.
            self._metrics.message_sent(kind_of(outbound.message).value)

    # ---- paho callbacks (network thread: quick, never blocking)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self._config.mqtt.url, reason_code)
            if reason_code.value in REFUSED_FOR_GOOD:
                self._on_fatal(
                    FatalReason.BROKER_REFUSED,
                    f"broker {self._config.mqtt.url} refused us: {reason_code}",
                )
            return
        client.subscribe(self._topics.coordinator_subscriptions())
        self._connected.set()
        log.info("connected to %s", self._config.mqtt.url)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
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

    def _handle_message(self, client, userdata, message) -> None:
        received = self._decoder.decode(message.topic, message.payload)
        if received is None:
            return
        try:
            self._inbox.put_nowait(received)
        except queue.Full:
            self._metrics.message_rejected(RejectReason.OVERLOAD.value)
            log.error(
                "inbound queue full: dropped a %s from %s",
                received.envelope.kind,
                received.device_id,
            )

    # ---- worker threads

    def _forward_inbound(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            self._forward([first, *self._take(MAX_BATCH - 1)])

    def _forward_remaining(self) -> None:
        while batch := self._take(MAX_BATCH):
            self._forward(batch)

    def _forward(self, batch: list[Received]) -> None:
        for attempt in range(5):
            try:
                self._port.ingest(batch)
                return
            except Unavailable as err:
                log.warning("fleet state unavailable (%s); retrying", err)
                time.sleep(backoff_delay(attempt, base_s=0.5, cap_s=10.0))
        log.error("dropped %d device messages: the fleet state stayed unavailable", len(batch))

    def _take(self, limit: int) -> list[Received]:
        batch = []
        while len(batch) < limit:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _control_loop(self) -> None:
        interval = self._config.tick_interval_s
        next_metrics = 0.0
        failures = 0
        while not self._stopping.wait(interval if failures == 0 else backoff_delay(failures)):
            try:
                for outbound in self._port.tick():
                    self.publish(outbound)
                if time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + self._config.metrics_interval_s
                    self._metrics.apply(self._port.metrics_report())
                failures = 0
            except Unavailable as err:
                failures = min(failures + 1, 6)
                log.warning("tick skipped: %s", err)
            except Exception:
                failures = min(failures + 1, 6)
                log.exception("tick failed")
