"""paho's client without the MQTT v5 property objects it builds for every PUBLISH and PUBACK.

paho 2.x decodes each packet's properties into a `Properties` (and each PUBACK's reason into a
`ReasonCode`): building one copies a table of every property or reason name, and setting each
property searches that table, ~70 µs of CPU for a device's PUBLISH with its three properties
and ~40 µs for a bare PUBACK, more than the coordinator spends decoding the message itself.
The skipfleet protocol carries everything in the payload (shared.protocol.envelope), so the
coordinator never reads an inbound PUBLISH's properties, and a PUBACK matters only as success or
failure. LeanClient reads those two packets itself in their common forms (a QoS 0 or 1 PUBLISH;
a PUBACK without properties) and hands every other packet, and any it finds malformed, to paho.
It also sends a batch's acknowledgements as one write (paho's ack() wakes its network thread
and makes a send() call per message), finds the next publish waiting for room in flight without
paho's scan of every outgoing message on each PUBACK, and reads its socket a chunk at a time
(paho makes three or more recv() calls a packet, each a release of the GIL the other threads
wait for). While no message_callback_add filter was ever added, a message goes straight to
on_message, without paho's match of its topic against the (empty) filters.

An inbound message's `properties` is None (as on MQTT 3.1.1); a successful PUBACK's reason code
and properties are shared, read-only instances.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Literal

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from paho.mqtt.client import _InPacket

PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)  # "Success" (0): never modified
NO_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)
_PUBACK_FIXED_HEADER = bytes([PacketTypes.PUBACK << 4, 2])  # then the 2-byte packet id
_VBI_MAX_BYTES = 4  # a Variable Byte Integer has at most 4 bytes
# Packets publishing_many() queues before it wakes the network thread to write them.
WAKE_EVERY = 64
# Bytes one read asks the socket for: a round's reports are ~13 KB each, its statuses ~0.2 KB.
READ_CHUNK = 64 * 1024


class NotCommonForm(Exception):
    """The packet is not in the form this client reads itself: paho reads it."""


def split_publish(header: int, body: bytes | bytearray) -> tuple[bytes, int, bytes]:
    """(topic, mid, payload) of an MQTT v5 QoS 0/1 PUBLISH, its properties skipped;
    NotCommonForm for anything else (QoS 2, a length that does not add up)."""
    qos = (header & 0x06) >> 1
    if qos > 1 or len(body) < 3:
        raise NotCommonForm
    topic_end = 2 + int.from_bytes(body[:2], "big")
    position = topic_end + 2 * qos  # the packet id of a QoS 1 message
    properties_length, size = variable_int(body, position)
    payload_start = position + size + properties_length
    if topic_end == 2 or payload_start > len(body):
        raise NotCommonForm
    mid = int.from_bytes(body[topic_end:position], "big") if qos else 0
    return bytes(body[2:topic_end]), mid, bytes(memoryview(body)[payload_start:])


def variable_int(data: bytes | bytearray, start: int) -> tuple[int, int]:
    """(value, bytes used) of the MQTT Variable Byte Integer at data[start:]."""
    value = 0
    for used in range(_VBI_MAX_BYTES):
        if start + used >= len(data):
            raise NotCommonForm
        byte = data[start + used]
        value |= (byte & 0x7F) << (7 * used)
        if not byte & 0x80:
            return value, used + 1
    raise NotCommonForm


def next_packet(data: bytearray, start: int) -> tuple[int, int, int] | None:
    """(command byte, body start, body end) of the packet at data[start:], or None while it
    is not all there; MalformedPacket if its Remaining Length runs past 4 bytes."""
    try:
        length, size = variable_int(data, start + 1)
    except NotCommonForm:  # the length's bytes not all there yet, or more than 4 of them
        if len(data) - (start + 1) < _VBI_MAX_BYTES:
            return None
        raise MalformedPacket("a Remaining Length of more than 4 bytes") from None
    begin = start + 1 + size
    end = begin + length
    return (data[start], begin, end) if end <= len(data) else None


def successful_puback_mid(body: bytes | bytearray) -> int:
    """The packet id of a PUBACK with reason Success and no properties (2-4 bytes: the id, then
    optionally reason 0 and an empty property length); NotCommonForm otherwise."""
    if len(body) < 2 or len(body) > 4 or any(body[2:]):
        raise NotCommonForm
    return int.from_bytes(body[:2], "big")


class ReceivedMessage(paho.MQTTMessage):
    """paho's message for a PUBLISH read in its common form, less the MQTTMessageInfo paho
    makes for every message (a threading.Condition and its RLock, ~10 µs): `info` tracks a
    publish for its sender, and a received message shares one that nothing reads."""

    __slots__ = ()
    _INFO = paho.MQTTMessageInfo(0)

    def __init__(self, mid: int, topic: bytes, header: int, payload: bytes) -> None:
        self.timestamp = paho.time_func()
        self.state = paho.mqtt_ms_invalid
        self.dup = bool(header & 0x08)
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = (header & 0x06) >> 1
        self.retain = bool(header & 0x01)
        self.info = self._INFO
        self.properties = None


class LeanClient(paho.Client):
    """A paho Client (same construction, same callbacks) for MQTT v5, reading its common
    inbound PUBLISH and PUBACK packets without building property objects; and acknowledging
    many messages at once (ack_many)."""

    _deferring: int | None = None  # the thread inside publishing_many(), if one is
    _deferred = 0  # packets it queued without a wake-up
    _filtered_callbacks = False  # message_callback_add was called

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # QoS > 0 publishes that found no room in flight, oldest first (under
        # _out_message_mutex): paho looks for them by walking every outgoing message from the
        # oldest on each PUBACK, past all those in flight, so a burst of n publishes with a
        # window of w cost n x w steps (10,000 pointers, a window of 1,000: 10 million).
        self._waiting: deque[int] = deque()
        # What the network thread read of its socket and has not handled: the start of a
        # packet whose end has not arrived yet
        self._unread = bytearray()
        self._unread_from: object = None  # the socket it came from

    def adopt_receive_maximum(self, properties: Properties | None) -> None:
        """Keeps as many QoS 1 publishes in flight as the broker's CONNACK allows (its Receive
        Maximum, MQTT v5), where paho keeps its own 20 whatever the broker allows. Called from
        on_connect, before anything is published on the new connection. (A coordinator handing
        out a round's jobs waited for PUBACKs 20 at a time, each read by a network thread busy
        decoding the reports those jobs brought back.)"""
        receive_maximum = getattr(properties, "ReceiveMaximum", None)
        if isinstance(receive_maximum, int) and receive_maximum > 0:
            self._max_inflight_messages = receive_maximum

    @contextmanager
    def publishing_many(self) -> Iterator[None]:
        """Inside the block, this thread's publishes wake the network thread once every
        WAKE_EVERY packets (and at the end), not once each: paho writes a byte to its wake-up
        socket per packet, and the network thread wakes to write that one packet (a promotion's
        10,000 pointers: 10,000 wake-ups, each a switch of the GIL between the two threads)."""
        self._deferring = threading.get_ident()
        self._deferred = 0
        try:
            yield
        finally:
            self._deferring = None
            if self._deferred:
                self._wake_network_thread()

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if self._deferring != threading.get_ident() or self._thread is None:
            return super()._packet_queue(command, packet, mid, qos, info)
        queued: Any = {"command": command, "mid": mid, "qos": qos, "pos": 0,
                       "to_process": len(packet), "packet": packet, "info": info}  # fmt: skip
        self._out_packet.append(queued)  # as paho queues it, less its wake-up
        self._deferred += 1
        if self._deferred % WAKE_EVERY == 0:
            self._wake_network_thread()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish(
        self,
        topic: str,
        payload: paho.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        if not qos:
            return super().publish(topic, payload, qos, retain, properties)
        with self._out_message_mutex:  # an RLock paho takes again: a PUBACK waits till noted
            info = super().publish(topic, payload, qos, retain, properties)
            message = self._out_messages.get(info.mid)
            queued = message is not None and message.state == paho.mqtt_ms_queued
            if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and queued:
                self._note_queued(info.mid)
        return info

    def held_beyond_flight(self) -> int:
        """QoS > 0 publishes paho holds and has not sent on this connection: waiting for room
        in flight, or for a connection. Read without paho's lock: a close count, not an exact
        one, for a caller deciding whether to hand paho more."""
        return len(self._out_messages) - self._inflight_messages

    def _note_queued(self, mid: int) -> None:
        """A publish found no room in flight (state mqtt_ms_queued): a PUBACK sends it. Called
        with _out_message_mutex held, by publish and by any subclass that queues one itself."""
        self._waiting.append(mid)

    def _update_inflight(self) -> MQTTErrorCode:
        """paho's (called with _out_message_mutex held, after a PUBACK freed room): sends the
        oldest publishes waiting for room, taken from _waiting instead of found by a scan."""
        while self._waiting and self._inflight_messages < self._max_inflight_messages:
            message = self._out_messages.get(self._waiting.popleft())
            if message is None or message.state != paho.mqtt_ms_queued:
                continue  # gone, or sent since (a reconnect resets what waits: below)
            self._inflight_messages += 1
            message.state = (
                paho.mqtt_ms_wait_for_puback if message.qos == 1 else paho.mqtt_ms_wait_for_pubrec
            )
            rc = self._send_publish(
                message.mid,
                message.topic.encode("utf-8"),
                message.payload,
                message.qos,
                message.retain,
                message.dup,
                properties=message.properties,
            )
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def drop_out_messages(self) -> list[paho.MQTTMessage]:
        """paho's; nothing dropped waits for room (a stale mid could name a later message)."""
        with self._out_message_mutex:
            self._waiting.clear()
            return super().drop_out_messages()

    def _messages_reconnect_reset_out(self) -> None:
        """paho's, then what waits for room is what paho left queued, in its order."""
        with self._out_message_mutex:
            super()._messages_reconnect_reset_out()
            self._waiting = deque(
                mid for mid, m in self._out_messages.items() if m.state == paho.mqtt_ms_queued
            )

    def _wake_network_thread(self) -> None:
        if self._sockpairW is not None:
            with suppress(BlockingIOError):  # its buffer is full of wake-ups already
                self._sockpairW.send(paho.sockpair_data)

    def _packet_read(self) -> MQTTErrorCode:
        """paho reads a packet with a recv() for its command byte, one for each byte of its
        length and one or more for its body, then goes back to select(). This takes what the
        socket holds (up to READ_CHUNK) in one recv() and handles every complete packet in it;
        a packet's start waits here for its end, which select() reports when it arrives. As
        paho's, it returns MQTT_ERR_AGAIN once the socket would block (loop_read reads again
        until then, or for at most its max_packets reads)."""
        if self._sock is not self._unread_from:  # a new connection: nothing of the last one's
            self._unread, self._unread_from = bytearray(), self._sock
        elif self._unread:  # whole packets left behind by a callback that raised: first
            rc = self._handle_unread()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        try:
            data = self._sock_recv(READ_CHUNK)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:  # a timeout included
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            data = b""
        if not data:  # the connection is gone, and a packet it cut short with it
            self._unread = bytearray()
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        self._unread += data
        return self._handle_unread()

    def _handle_unread(self) -> MQTTErrorCode:
        """Hands paho each whole packet read, in order, while the connection it came on is
        open (paho reads nothing after a DISCONNECT has closed it)."""
        unread, position = self._unread, 0
        try:
            while (
                self._sock is self._unread_from
                and (found := next_packet(unread, position)) is not None
            ):
                command, begin, position = found
                self._in_packet = _read_packet(command, unread[begin:position])
                rc = self._packet_handle()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
        except MalformedPacket as err:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", err)
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            del unread[:position]
            self._in_packet = _no_packet()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Iterable[int]) -> None:
        """ack(mid, 1) for each QoS 1 message (manual acks), queued as one write: the network
        thread is woken once and sends them in one go, not once per message."""
        if not self._manual_ack:
            return  # paho acknowledged them itself
        packets = b"".join(_PUBACK_FIXED_HEADER + mid.to_bytes(2, "big") for mid in mids)
        if packets:
            self._packet_queue(PacketTypes.PUBACK << 4, packets, 0, 0)

    def _handle_publish(self) -> MQTTErrorCode:
        header, body = self._in_packet["command"], self._in_packet["packet"]
        if self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._handle_publish()
        try:
            topic, mid, payload = split_publish(header, body)
        except NotCommonForm:
            return super()._handle_publish()  # paho's own checks and errors
        message = ReceivedMessage(mid, topic, header, payload)
        self._handle_on_message(message)
        if message.qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def message_callback_add(self, sub: str, callback: paho.CallbackOnMessage) -> None:
        self._filtered_callbacks = True  # from now on paho matches each message's topic
        super().message_callback_add(sub, callback)

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        """paho's, less its match of every message's topic against the filters of
        message_callback_add (a split of the topic and a walk of a tree, ~10 µs a message)
        while none was ever added: the message goes to on_message."""
        if self._filtered_callbacks:
            return super()._handle_on_message(message)
        with self._callback_mutex:
            on_message = self.on_message
        if on_message is None:
            return
        with self._in_callback_mutex:
            try:
                on_message(self, self._userdata, message)
            except Exception as err:
                self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_message: %s", err)
                if not self.suppress_exceptions:
                    raise

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        if cmd != "PUBACK" or self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._handle_pubackcomp(cmd)
        try:
            mid = successful_puback_mid(self._in_packet["packet"])
        except NotCommonForm:
            return super()._handle_pubackcomp(cmd)  # a failure reason, or properties
        with self._out_message_mutex:
            if mid in self._out_messages:  # only the first PUBACK of a message counts
                return self._do_on_publish(mid, PUBACK_SUCCESS, NO_PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def _read_packet(command: int, body: bytearray) -> _InPacket:
    """paho's record of the packet being read, read in full (its handlers take it from there)."""
    return {"command": command, "have_remaining": 1, "remaining_count": [],
            "remaining_mult": 1, "remaining_length": len(body), "packet": body,
            "to_process": 0, "pos": 0}  # fmt: skip


def _no_packet() -> _InPacket:
    """paho's record between packets, as paho resets it after one."""
    return {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
            "remaining_length": 0, "packet": bytearray(b""), "to_process": 0,
            "pos": 0}  # fmt: skip
