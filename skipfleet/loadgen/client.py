"""The simulated devices' MQTT client: a LeanClient that costs less CPU per packet.

A generator process runs hundreds of clients on one loop, and paho's per-packet bookkeeping was
a third of its CPU in a round (py-spy, `python -m skipfleet.bench_loadgen`). What goes over the
wire is unchanged (the same packets, in the same order, in the same loop turn); only how this
process gets them in and out of its sockets differs:
- reads: paho asks the socket for 1 byte (the packet type), then 1 byte at a time for the
  length, then the rest: 3-6 recv calls a packet. LeanClient (shared.lean_client) reads what the
  socket holds at once and handles every whole packet in it;
- an inbound PUBLISH goes straight to `on_payload(topic, payload)`: no MQTTMessage (each makes
  a threading.Condition for its MQTTMessageInfo), no topic-filter matching (the devices add no
  per-topic callbacks), no callback locks;
- a QoS 1 publish without properties is queued as paho queues it, but its MQTTMessageInfo
  shares one Condition (everything runs on one thread; nothing here waits on it);
- packets queued back to back (a PUBACK and the status it led to) are written with one send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

from shared.lean_client import LeanClient, NotCommonForm, split_publish

PUBLISH, PUBACK = 0x30, 0x40
# Packets that can share a send with the one queued before them: nothing is done after they are
# written (paho's _packet_write acts after a QoS 0 PUBLISH and a DISCONNECT).
_MERGEABLE = frozenset({PUBACK, PUBLISH})
_SHARED_CONDITION = threading.Condition()

OnPayload = Callable[[str, bytes], None]


class _Info(paho.MQTTMessageInfo):
    """paho's MQTTMessageInfo without a Condition of its own."""

    __slots__ = ()

    def __init__(self, mid: int) -> None:  # not super().__init__: the Condition is what costs
        self.mid = mid
        self._published = False
        self._condition = _SHARED_CONDITION
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0


class _Message(paho.MQTTMessage):
    """An outgoing QoS 1 message as paho keeps it until its PUBACK, with an _Info."""

    __slots__ = ()

    def __init__(self, mid: int, topic: bytes, payload: bytes, retain: bool, now: float) -> None:
        self.timestamp = now
        self.state = paho.mqtt_ms_invalid
        self.dup = False
        self.mid = mid
        self._topic = topic
        self.payload = payload
        self.qos = 1
        self.retain = retain
        self.info = _Info(mid)
        self.properties = None


class DeviceClient(LeanClient):
    """A LeanClient for one simulated device (MQTT v5, driven by skipfleet.loadgen.connection).

    Set `on_payload(topic, payload)` to receive PUBLISH packets in their common form (anything
    else still goes through paho and `on_message`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.on_payload: OnPayload | None = None

    # ---- reading (whole packets a read at a time: LeanClient)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """paho's loop_read, but on until the socket would block, not for max_packets reads:
        this loop is woken by the socket's readiness, which does not report what TLS holds
        decrypted already (paho's own loop checks for it), and a closed connection is noticed
        in the same call."""
        while True:
            if self._sock is None:
                return MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_publish(self) -> MQTTErrorCode:
        on_payload = self.on_payload
        header, body = self._in_packet["command"], self._in_packet["packet"]
        if on_payload is None or self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._handle_publish()
        try:
            topic, mid, payload = split_publish(header, body)
        except NotCommonForm:
            return super()._handle_publish()
        on_payload(topic.decode(), payload)
        if header & 0x06 and not self._manual_ack:  # QoS 1: acknowledged once handled, as paho
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    # ---- writing

    def publish(
        self,
        topic: str,
        payload: paho.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: paho.Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        """paho's publish; a QoS 1 message without properties with a lighter MQTTMessageInfo."""
        if qos != 1 or properties is not None or not isinstance(payload, bytes):
            return super().publish(topic, payload, qos, retain, properties)
        topic_bytes = topic.encode()
        self._raise_for_invalid_topic(topic_bytes)
        message = _Message(self._mid_generate(), topic_bytes, payload, retain, paho.time_func())
        with self._out_message_mutex:
            if 0 < self._max_queued_messages <= len(self._out_messages) or (
                message.mid in self._out_messages
            ):
                message.info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                return message.info
            self._out_messages[message.mid] = message
            if 0 < self._max_inflight_messages <= self._inflight_messages:
                message.state = paho.mqtt_ms_queued  # sent when a PUBACK frees a slot
                self._note_queued(message.mid)
                return message.info
            self._inflight_messages += 1
            message.state = paho.mqtt_ms_wait_for_puback
            rc = self._send_publish(message.mid, topic_bytes, payload, 1, retain, False,
                                    message.info, None)  # fmt: skip
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                self._inflight_messages -= 1
                message.state = paho.mqtt_ms_publish
            message.info.rc = rc
            return message.info

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        """paho's _packet_queue; a PUBACK or QoS 1 PUBLISH after another one not yet being
        written joins it, to go out in the same send."""
        queue = self._out_packet
        if queue and _mergeable(command, qos):
            last = queue[-1]
            if last["pos"] == 0 and _mergeable(last["command"], last["qos"]):
                joined = last["packet"]
                if not isinstance(joined, bytearray):
                    joined = last["packet"] = bytearray(joined)
                joined += packet
                last["to_process"] += len(packet)
                self._call_socket_register_write()  # asked already (a no-op), unless paho forgot
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._packet_queue(command, packet, mid, qos, info)


def _mergeable(command: int, qos: int) -> bool:
    kind = command & 0xF0
    return kind in _MERGEABLE and (kind != PUBLISH or qos == 1)
