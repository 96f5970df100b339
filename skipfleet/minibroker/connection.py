"""One client's TCP connection: framing the byte stream, decoding packets, answering them, keep
alive, and flow control. An asyncio Protocol, so a connection costs callbacks, not a thread or a
task: thousands of clients fit in one process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from skipfleet.minibroker.broker import Broker
from skipfleet.minibroker.codes import (
    PacketError,
    PacketType,
    PropertyId,
    ProtocolLevel,
    ReasonCode,
)
from skipfleet.minibroker.encoding import (
    PINGRESP,
    encode_ack,
    encode_connack,
    encode_disconnect,
    encode_publish,
    encode_suback,
    encode_unsuback,
)
from skipfleet.minibroker.message import Delivery, Message
from skipfleet.minibroker.packets import (
    Connect,
    Disconnect,
    PacketIdAck,
    PingReq,
    Publish,
    Subscribe,
    Unsubscribe,
    Will,
)
from skipfleet.minibroker.protocol import decode_connect, decode_packet, find_frame
from skipfleet.minibroker.sessions import Session
from skipfleet.minibroker.wire import encode_property

log = logging.getLogger("skipfleet.minibroker")

KEEPALIVE_GRACE = 1.5  # §3.1.2.10: silent for 1.5 keep-alive periods means gone
CLOSE_GRACE_S = 5.0  # a client that does not read its last bytes is cut off after this
# Enum attribute access is slow on Python 3.11; the per-message paths use plain references.
_PUBACK, _PUBREC, _PUBREL = PacketType.PUBACK, PacketType.PUBREC, PacketType.PUBREL
_SUCCESS, _NO_SUBSCRIBERS = ReasonCode.SUCCESS, ReasonCode.NO_MATCHING_SUBSCRIBERS
_EXPIRY = PropertyId.MESSAGE_EXPIRY_INTERVAL


class ClientConnection(asyncio.Protocol):
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.level = ProtocolLevel.MQTT_5
        self.v5 = True
        self.client_id: str | None = None
        self.session: Session | None = None
        self.will: Will | None = None
        self.writable = True
        self._outgoing: list[bytes] = []  # written out once per loop iteration (fewer syscalls)
        self._flush_scheduled = False
        self._connected = False
        self._closed = False
        self._keepalive_s = 0
        self._client_max_packet: int | None = None
        self._buffer = bytearray()
        self._last_heard = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"ClientConnection({self.client_id!r})"

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.broker.config.write_buffer_limit)
        self.broker.connections.add(self)
        self.broker.counters.connections_total += 1
        self._last_heard = self.broker.now()
        self._timer = self.broker.loop.call_later(
            self.broker.config.connect_timeout_s, self._connect_timed_out
        )

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._last_heard = self.broker.now()
        self._buffer += data
        try:
            self._handle_buffered_packets()
        except PacketError as error:
            self._fail(error.reason, error.detail)
        except Exception:
            # A bug must cost one client its connection, never the broker its loop.
            log.exception("client %s: internal error, disconnecting it", self.client_id)
            self.broker.counters.internal_errors += 1
            self._fail(ReasonCode.UNSPECIFIED_ERROR, "internal error")

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(publish_will=True)  # no DISCONNECT came first: the Will goes out

    def pause_writing(self) -> None:
        self.writable = False  # deliveries now wait in the session queue

    def resume_writing(self) -> None:
        self.writable = True
        if self.session is not None:
            self.broker.pump(self.session)

    # ---- incoming packets ----------------------------------------------------------------------

    def _handle_buffered_packets(self) -> None:
        buffer, start = self._buffer, 0
        limit = self.broker.config.max_packet_size
        try:
            while not self._closed:
                frame = find_frame(buffer, limit, start)
                if frame is None:
                    return
                body = bytes(buffer[frame.body_start : frame.end])
                start = frame.end
                self._handle_frame(frame.first_byte, body)
        finally:
            del buffer[:start]

    def _handle_frame(self, first_byte: int, body: bytes) -> None:
        if not self._connected:
            if first_byte >> 4 != PacketType.CONNECT:
                raise PacketError(ReasonCode.PROTOCOL_ERROR, "first packet is not CONNECT")
            self._on_connect(decode_connect(body))
            return
        packet = decode_packet(first_byte, body, self.level)
        handler = _HANDLERS.get(type(packet))
        if handler is None:  # a second CONNECT
            raise PacketError(ReasonCode.PROTOCOL_ERROR, "CONNECT on a connected session")
        handler(self, packet)

    def _on_connect(self, connect: Connect) -> None:
        self.level = connect.level
        self.v5 = connect.level is ProtocolLevel.MQTT_5
        refusal = self.broker.admit(connect)
        if refusal is not ReasonCode.SUCCESS:
            log.info("refusing client %r: %s", connect.client_id, refusal.name)
            self.broker.counters.connections_refused += 1
            self._write(encode_connack(self.level, False, refusal))
            self._close(publish_will=False)
            return
        client_id = connect.client_id or self.broker.assign_client_id()
        self.client_id, self.will = client_id, connect.will
        self._keepalive_s = connect.keepalive_s
        self._client_max_packet = connect.maximum_packet_size
        self._connected = True
        session, present = self.broker.attach(self, connect, client_id)
        self.session = session
        props = self._connack_props(connect)
        self._write(encode_connack(self.level, present, ReasonCode.SUCCESS, props))
        self._arm_keepalive()
        self.broker.resume(session)

    def _connack_props(self, connect: Connect) -> list[tuple[PropertyId, Any]]:
        props: list[tuple[PropertyId, Any]] = [
            (PropertyId.MAXIMUM_PACKET_SIZE, self.broker.config.max_packet_size),
            (PropertyId.TOPIC_ALIAS_MAXIMUM, 0),
            (PropertyId.SUBSCRIPTION_IDENTIFIER_AVAILABLE, 0),
            (PropertyId.SHARED_SUBSCRIPTION_AVAILABLE, 0),
        ]
        if not connect.client_id:
            props.append((PropertyId.ASSIGNED_CLIENT_IDENTIFIER, self.client_id))
        return props

    def _on_publish(self, publish: Publish) -> None:
        assert self.session is not None and self.client_id is not None
        self.broker.counters.messages_received += 1
        if publish.qos == 2 and publish.packet_id in self.session.awaiting_pubrel:
            # A re-sent QoS 2 PUBLISH we already routed: acknowledge, do not route twice.
            self._write(encode_ack(_PUBREC, publish.packet_id, self.level))
            return
        message = Message.from_publish(publish, self.client_id, self.broker.now())
        routed = self.broker.publish(message)
        reason = _SUCCESS if routed else _NO_SUBSCRIBERS
        if publish.qos == 1:
            self._write(encode_ack(_PUBACK, publish.packet_id, self.level, reason))
        elif publish.qos == 2:
            self.session.awaiting_pubrel.add(publish.packet_id)
            self._write(encode_ack(_PUBREC, publish.packet_id, self.level, reason))

    def _on_ack(self, ack: PacketIdAck) -> None:
        assert self.session is not None
        if ack.kind is _PUBACK:
            if self.session.acknowledge(ack.packet_id):
                self.broker.pump(self.session)
        elif ack.kind is _PUBREL:
            known = ack.packet_id in self.session.awaiting_pubrel
            self.session.awaiting_pubrel.discard(ack.packet_id)
            reason = ReasonCode.SUCCESS if known else ReasonCode.PACKET_IDENTIFIER_NOT_FOUND
            self._write(encode_ack(PacketType.PUBCOMP, ack.packet_id, self.level, reason))
        else:  # PUBREC / PUBCOMP answer QoS 2 deliveries, which this broker never makes
            raise PacketError(ReasonCode.PROTOCOL_ERROR, f"{ack.kind.name} for a QoS 2 never sent")

    def _on_subscribe(self, subscribe: Subscribe) -> None:
        assert self.session is not None
        codes, wants_retained = self.broker.subscribe(self.session, subscribe.requests, self.v5)
        self._write(encode_suback(self.level, subscribe.packet_id, codes))
        for topic_filter, options in wants_retained:
            self.broker.send_retained(self.session, topic_filter, options)

    def _on_unsubscribe(self, unsubscribe: Unsubscribe) -> None:
        assert self.session is not None
        codes = self.broker.unsubscribe(self.session, unsubscribe.topic_filters)
        self._write(encode_unsuback(self.level, unsubscribe.packet_id, codes))

    def _on_pingreq(self, ping: PingReq) -> None:
        self._write(PINGRESP)

    def _on_disconnect(self, disconnect: Disconnect) -> None:
        assert self.session is not None
        new_expiry = disconnect.session_expiry_s
        if new_expiry is not None:
            if self.session.expiry_s == 0 and new_expiry != 0:
                raise PacketError(ReasonCode.PROTOCOL_ERROR, "session expiry raised from 0")
            self.session.expiry_s = new_expiry
        # §3.14.4: only a normal disconnection (0x00) discards the Will; 0x04 asks for it and
        # any error code reports an abnormal end.
        self._close(publish_will=disconnect.reason != ReasonCode.SUCCESS)

    # ---- outgoing ------------------------------------------------------------------------------

    def send_delivery(self, delivery: Delivery) -> None:
        """Send a delivery now; QoS 1 takes an in-flight slot until the client's PUBACK."""
        assert self.session is not None
        if delivery.message.is_expired(self.broker.now()):
            self.broker.counters.messages_expired += 1
            return
        packet_id = self.session.start_inflight(delivery) if delivery.qos else 0
        if not self.send_publish(delivery, packet_id, dup=False) and packet_id:
            self.session.acknowledge(packet_id)  # never sent, so nothing to wait for

    def send_publish(self, delivery: Delivery, packet_id: int, *, dup: bool) -> bool:
        """Write one PUBLISH; False if it was dropped for exceeding the client's MQTT 5 Maximum
        Packet Size (§3.1.2.11.4: the server must not send it, and discards it)."""
        message = delivery.message
        properties = b""
        if self.v5:
            properties = message.forwarded_properties
            remaining = message.remaining_expiry_s(self.broker.now())
            if remaining is not None:
                expiry = encode_property(_EXPIRY, max(remaining, 1))
                properties = expiry + properties
        packet = encode_publish(
            self.level,
            message.topic_bytes,
            message.payload,
            qos=delivery.qos,
            retain=delivery.retain,
            dup=dup,
            packet_id=packet_id,
            properties=properties,
        )
        if self._client_max_packet is not None and len(packet) > self._client_max_packet:
            self.broker.counters.messages_dropped += 1
            return False
        self._write(packet)
        self.broker.counters.messages_sent += 1
        return True

    def _write(self, data: bytes) -> None:
        if self._closed:
            return
        self._outgoing.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.broker.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hand everything written since the last flush to the socket in one write."""
        self._flush_scheduled = False
        data, self._outgoing = b"".join(self._outgoing), []
        # is_closing(): the socket may already be gone before connection_lost() runs.
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # ---- ending the connection -----------------------------------------------------------------

    def _fail(self, reason: ReasonCode, detail: str) -> None:
        """Disconnect a client that broke the protocol (or went silent); its Will goes out."""
        log.info("disconnecting client %s: %s", self.client_id, detail)
        self.broker.counters.forced_disconnects += 1
        if self._connected and self.v5:
            self._write(encode_disconnect(reason))
        elif not self._connected and reason is ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            # §3.1.2.2: answer an unknown level with the 3.1.1 CONNACK every version can read.
            self._write(encode_connack(ProtocolLevel.MQTT_3_1_1, False, reason))
        self._close(publish_will=True)

    def close_for_takeover(self) -> Will | None:
        """Another connection took this client id: close quietly and hand the Will to the
        broker, which decides whether it is published."""
        if self.v5:
            self._write(encode_disconnect(ReasonCode.SESSION_TAKEN_OVER))
        self.session = None
        self._close(publish_will=False)
        return self.will

    def shut_down(self) -> None:
        """The broker is stopping: no Wills (there is nobody left to tell), no lingering."""
        if self._connected and self.v5:
            self._write(encode_disconnect(ReasonCode.SERVER_SHUTTING_DOWN))
        self._close(publish_will=False)
        if self.transport is not None:
            self.transport.abort()  # what write() could not send at once is dropped

    def _close(self, *, publish_will: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.broker.connections.discard(self)
        self._flush()
        if self.transport is not None:
            self.transport.close()
            # close() waits for buffered bytes to be read; a stuck client must not pin the socket.
            self.broker.loop.call_later(CLOSE_GRACE_S, self.transport.abort)
        session, self.session = self.session, None
        if session is not None:
            self.broker.detach(session, self.will if publish_will else None)

    # ---- timers --------------------------------------------------------------------------------

    def _connect_timed_out(self) -> None:
        if not self._connected:
            self._fail(ReasonCode.MAXIMUM_CONNECT_TIME, "no CONNECT in time")

    def _arm_keepalive(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        if self._keepalive_s:
            limit = self._keepalive_s * KEEPALIVE_GRACE
            self._timer = self.broker.loop.call_later(limit, self._check_keepalive)

    def _check_keepalive(self) -> None:
        # Re-armed from the last packet heard rather than reset on every packet: cheaper.
        limit = self._keepalive_s * KEEPALIVE_GRACE
        silent_for = self.broker.now() - self._last_heard
        if silent_for >= limit:
            self._fail(ReasonCode.KEEP_ALIVE_TIMEOUT, f"silent for {silent_for:.1f} s")
        else:
            self._timer = self.broker.loop.call_later(limit - silent_for, self._check_keepalive)


_HANDLERS = {
    Publish: ClientConnection._on_publish,
    PacketIdAck: ClientConnection._on_ack,
    Subscribe: ClientConnection._on_subscribe,
    Unsubscribe: ClientConnection._on_unsubscribe,
    PingReq: ClientConnection._on_pingreq,
    Disconnect: ClientConnection._on_disconnect,
}
