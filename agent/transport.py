"""The paho-mqtt 2.x client of the agent: connection, presence, subscriptions, PUBACKs.

- `connect_async` + `loop_start`: a broker that is down at start is retried like a lost one,
  with jittered backoff (shared.mqtt.make_client spreads each client's reconnect delays).
- Presence: Last Will retained `offline` (v5: with a will delay to ride out short reconnects),
  retained `online` after every CONNACK, `offline` published by `stop()` on a clean shutdown.
- Subscriptions are made in `on_connect`, so they come back after every reconnect.
- Every callback is wrapped: an exception is logged and never reaches paho's network thread.
- Callbacks only enqueue (agent.handoff): accepting or rejecting a job (job history fsync, a
  status spooled), a PUBACK (a spool row deleted) and the connection events run on the handoff
  worker, in paho's order. Nothing blocks, writes to disk or trains on paho's thread.
- Commands are acknowledged (manual PUBACK) only after the worker handled them: a job is in the
  job history before the broker forgets it, so an agent that dies in between gets it again. A
  message that arrived on an earlier connection is not acknowledged (its mid means nothing on
  this one): the broker delivers it again and the job history drops the repeat.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import paho.mqtt.client as paho

from agent.errors import BrokerRefused
from agent.handoff import Handoff
from agent.outbox import Outbox
from agent.spool import SpoolItem
from shared.mqtt import (
    MqttSettings,
    Will,
    connect_async,
    describe_refusal,
    logged,
    make_client,
    report_connect_failures,
)

log = logging.getLogger(__name__)

# CONNACK reason codes that retrying cannot fix (MQTT 3.1.1 return codes 4 and 5 map to them).
BAD_CREDENTIALS = 0x86
NOT_AUTHORIZED = 0x87
# Publish failed for a reason that may pass (v5 PUBACK): keep the message and try again later.
QUOTA_EXCEEDED = 0x97


class QuietNotConnected(logging.Filter):
    """paho logs "Client is not connected. Socket: None) ..." at ERROR on every failed connect
    attempt; our own connect-failure line already says why and what to check (README's table)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


PAHO_LOG = logging.getLogger("paho")
PAHO_LOG.addFilter(QuietNotConnected())


class Transport:
    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        subscriptions: list[tuple[str, int]],
        status_topic: str,
        will: Will,
        online_payload: Callable[[], bytes],
        outbox: Outbox,
        on_message: Callable[[str, bytes, bool], None],  # topic, payload, retained
        on_fatal: Callable[[BrokerRefused], None],
        on_connected: Callable[[], None] = lambda: None,
    ):
        self._settings = settings
        self._subscriptions = subscriptions
        self._status_topic = status_topic
        self._online_payload = online_payload
        self._outbox = outbox
        self._on_message = on_message
        self._on_fatal = on_fatal
        self._on_connected = on_connected
        self.connected = threading.Event()
        self.handoff = Handoff()
        self._connection = 0  # which connection a message arrived on (network thread writes)
        self._client = make_client(settings, client_id, will=will, manual_ack=True)
        self._client.enable_logger(PAHO_LOG)
        report_connect_failures(self._client, settings, log)  # refused, TLS: why, what to check
        self._client_id = client_id
        self._told_not_authorized = False  # the ACL explanation, once per connection
        self._client.on_connect = logged(self._handle_connect)
        self._client.on_disconnect = logged(self._handle_disconnect)
        self._client.on_publish = logged(self._handle_publish)
        self._client.on_subscribe = logged(self._handle_subscribe)
        self._client.on_message = logged(self._handle_message)

    def start(self) -> None:
        log.info("connecting to %s", self._settings.url)
        self.handoff.start()
        connect_async(self._client, self._settings)
        self._client.loop_start()

    def publish_spooled(self, item: SpoolItem) -> int | None:
        """The outbox's publish function: paho's mid if paho now owns delivery, else None."""
        info = self._client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
        if info.rc == paho.MQTT_ERR_SUCCESS:
            return info.mid
        if info.rc == paho.MQTT_ERR_NO_CONN and item.qos > 0:
            return info.mid  # queued by paho: sent after the reconnect, PUBACK settles it
        return None

    def publish_direct(self, topic: str, payload: bytes, qos: int) -> None:
        """Bypass the spool (it cannot be written): paho holds a QoS 1 message in memory until
        its PUBACK, across reconnects, but not across a restart of the agent."""
        self._client.publish(topic, payload, qos=qos)

    def stop(self, offline_payload: bytes, timeout: float = 5.0) -> None:
        """Announce `offline` (the Will is not sent on a clean DISCONNECT), then disconnect."""
        if self.connected.is_set():
            info = self._client.publish(self._status_topic, offline_payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as err:  # lost the connection meanwhile
                log.warning("could not announce offline: %s", err)
        self._client.disconnect()
        self._client.loop_stop()
        self.handoff.stop()

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            message = describe_refusal(reason_code, self._settings)
            log.error("%s", message)
            if reason_code.value in (BAD_CREDENTIALS, NOT_AUTHORIZED):
                self._on_fatal(BrokerRefused(message))
            return
        self._told_not_authorized = False
        log.info("connected to %s (session present: %s)", self._settings.url, flags.session_present)
        self._connection += 1
        client.subscribe(self._subscriptions)  # paho calls: they only queue packets
        client.publish(self._status_topic, self._online_payload(), qos=1, retain=True)
        self.connected.set()
        self.handoff.submit(self._on_connected)  # the health file: a disk write
        self.handoff.submit(self._outbox.connected)

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.handoff.submit(self._outbox.disconnected)
        log.warning("disconnected from %s: %s", self._settings.url, reason_code)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.value == NOT_AUTHORIZED and not self._told_not_authorized:
            self._told_not_authorized = True  # a log line: no disk write, fine on this thread
            log.error("%s", self.not_authorized_message())
        # quota exceeded: paho forgot the message, the broker did not take it (None: try later)
        accepted = None if reason_code.value == QUOTA_EXCEEDED else not reason_code.is_failure
        self.handoff.submit(self._outbox.acknowledged, mid, accepted)

    def not_authorized_message(self) -> str:
        """Connected, yet every publish refused: the account is not this device's."""
        return (
            f"the broker refused our publishes (MQTT 5 PUBACK reason code 0x87 Not authorized): "
            f"its ACL lets an account publish only under its own device's topics, so the MQTT "
            f"user name ({self._settings.username!r}) must equal the device id "
            f"({self._client_id!r}). Use this device's own account (--username), or fix "
            f"--device-id; nothing this device reports reaches the coordinator until then"
        )

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("broker refused subscriptions: %s (check the ACL)", ", ".join(refused))

    def _handle_message(self, client, userdata, message) -> None:
        self.handoff.submit(self._deliver, message, self._connection)

    # -- on the handoff worker -----------------------------------------------------------------
    def _deliver(self, message: paho.MQTTMessage, connection: int) -> None:
        try:
            self._on_message(message.topic, message.payload, bool(message.retain))
        finally:  # a message that broke its handler would break it again: not redelivered
            if message.qos > 0 and connection == self._connection:
                self._client.ack(message.mid, message.qos)
