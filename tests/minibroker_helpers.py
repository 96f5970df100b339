"""Test clients for the minibroker: paho 2.x clients that record what their callbacks saw, and a
raw-socket client for what paho will not do (never acknowledge, send garbage).

Every wait is a condition with a timeout, never a sleep standing in for correctness.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311
TIMEOUT_S = 5.0


def wait_until(
    predicate: Callable[[], object], timeout_s: float = TIMEOUT_S, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(0.005)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: dict = field(default_factory=dict)


class Peer:
    """A paho client plus thread-safe records of its callbacks.

    `threaded=False` leaves paho's network loop to the test (`pump()`), so a test can stop
    pinging or cut the socket without paho reconnecting behind its back.
    """

    def __init__(
        self,
        port: int,
        client_id: str,
        protocol: MQTTProtocolVersion = V5,
        *,
        clean: bool = True,
        session_expiry_s: int = 0,
        keepalive_s: int = 60,
        auth: tuple[str, str | None] | None = None,
        will: tuple[str, bytes] | None = None,
        will_delay_s: int = 0,
    ) -> None:
        self.port, self.protocol, self.clean = port, protocol, clean
        self.session_expiry_s, self.keepalive_s = session_expiry_s, keepalive_s
        self._lock = threading.Lock()
        self.messages: list[Received] = []
        self.connacks: list[tuple[int, bool, dict]] = []
        self.disconnects: list[int] = []
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        v5 = protocol is V5
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            clean_session=None if v5 else clean,
        )
        if auth is not None:
            self.client.username_pw_set(*auth)
        if will is not None:
            props = None
            if v5 and will_delay_s:
                props = Properties(PacketTypes.WILLMESSAGE)
                props.WillDelayInterval = will_delay_s
            self.client.will_set(will[0], will[1], qos=1, retain=False, properties=props)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.threaded = False

    # ---- callbacks (paho's thread) ----
    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        props = properties.json() if properties is not None else {}
        with self._lock:
            self.connacks.append((reason.value, flags.session_present, props))

    def _on_disconnect(self, client, userdata, flags, reason, properties) -> None:
        with self._lock:
            self.disconnects.append(reason.value)

    def _on_message(self, client, userdata, msg) -> None:
        props = msg.properties.json() if msg.properties is not None else {}
        received = Received(msg.topic, msg.payload, msg.qos, bool(msg.retain), props)
        with self._lock:
            self.messages.append(received)

    def _on_publish(self, client, userdata, mid, reason, properties) -> None:
        with self._lock:
            self.pubacks[mid] = reason.value

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        with self._lock:
            self.subacks[mid] = [reason.value for reason in reasons]

    # ---- actions ----
    def connect(self, *, threaded: bool = True) -> Peer:
        """Connect and wait for CONNACK, accepted or not (see `accepted`, `connacks`)."""
        kwargs = {}
        if self.protocol is V5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry_s:
                props.SessionExpiryInterval = self.session_expiry_s
            kwargs = dict(clean_start=self.clean, properties=props)
        before = len(self.connacks)
        self.client.connect("127.0.0.1", self.port, self.keepalive_s, **kwargs)
        self.threaded = threaded
        if threaded:
            self.client.loop_start()
            wait_until(lambda: len(self.connacks) > before, what="CONNACK")
        else:
            self.pump_until(lambda: len(self.connacks) > before)
        return self

    def pump_until(self, predicate: Callable[[], object], timeout_s: float = TIMEOUT_S) -> None:
        """Run paho's loop on this thread until `predicate` holds (threaded=False only)."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("timed out pumping the paho loop")
            self.client.loop(timeout=0.01)

    @property
    def accepted(self) -> bool:
        return bool(self.connacks) and self.connacks[-1][0] == 0

    @property
    def session_present(self) -> bool:
        return self.connacks[-1][1]

    def subscribe(self, topic_filter: str, qos: int = 1) -> list[int]:
        result, mid = self.client.subscribe(topic_filter, qos=qos)
        assert result == paho.MQTT_ERR_SUCCESS
        wait_until(lambda: mid in self.subacks, what=f"SUBACK for {topic_filter}")
        return self.subacks[mid]

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False, props=None
    ) -> int:
        """Publish and, for QoS 1, wait for PUBACK; returns its reason code (0 for QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos == 0:
            return 0
        wait_until(lambda: info.mid in self.pubacks, what=f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def wait_messages(self, count: int, timeout_s: float = TIMEOUT_S) -> list[Received]:
        wait_until(lambda: len(self.messages) >= count, timeout_s, f"{count} messages")
        with self._lock:
            return list(self.messages)

    def topics(self) -> list[str]:
        with self._lock:
            return [message.topic for message in self.messages]

    def close(self) -> None:
        """A clean DISCONNECT, then stop paho's thread."""
        if self.threaded:
            before = len(self.disconnects)
            self.client.disconnect()
            wait_until(lambda: len(self.disconnects) > before, what="disconnect")
            self.client.loop_stop()
        else:
            self.client.disconnect()

    def cut(self) -> None:
        """Lose the connection without DISCONNECT (threaded=False clients)."""
        sock = self.client.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


# ---- raw MQTT 3.1.1 / 5 bytes, written out by hand (independent of the broker's codec) ---------


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = value >> 7, value & 0x7F
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


def packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + _varint(len(body)) + body


def connect_packet(
    client_id: str, *, level: int = 4, clean: bool = True, keepalive: int = 60, name: str = "MQTT"
) -> bytes:
    flags = 0x02 if clean else 0x00
    props = b"\x00" if level == 5 else b""
    body = _utf8(name) + bytes((level, flags)) + struct.pack(">H", keepalive) + props
    return packet(0x10, body + _utf8(client_id))


def subscribe_packet(packet_id: int, topic_filter: str, qos: int, *, level: int = 4) -> bytes:
    props = b"\x00" if level == 5 else b""
    body = struct.pack(">H", packet_id) + props + _utf8(topic_filter) + bytes((qos,))
    return packet(0x82, body)


def puback_packet(packet_id: int) -> bytes:
    return packet(0x40, struct.pack(">H", packet_id))


class RawClient:
    """A bare TCP connection speaking hand-made MQTT bytes."""

    def __init__(self, port: int, *, receive_buffer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connect, so the TCP window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(("127.0.0.1", port))
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_packet(self) -> tuple[int, bytes]:
        """(first byte, body) of the next packet; raises on timeout or closed connection."""
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("broker closed the connection")
            self._buffer += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(self._buffer):
                return None
            digit = self._buffer[pos]
            length |= (digit & 0x7F) << shift
            pos += 1
            if not digit & 0x80:
                break
            shift += 7
        if len(self._buffer) < pos + length:
            return None
        first, body = self._buffer[0], self._buffer[pos : pos + length]
        self._buffer = self._buffer[pos + length :]
        return first, body

    def is_closed_by_peer(self, timeout_s: float = TIMEOUT_S) -> bool:
        """True once the broker has closed the connection (whatever it sent first)."""
        self.sock.settimeout(timeout_s)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:  # reset by the broker
            return True
        return True

    def close(self) -> None:
        self.sock.close()


class Swarm:
    """Many paho clients driven by one thread through epoll (paho's external-loop API).

    paho's own loop uses select(), which cannot watch descriptors above 1023, and each client
    holds three (its socket and a wake-up pair): a few hundred threaded clients in one process
    hit that wall. Everything here runs on the caller's thread.
    """

    def __init__(self, port: int, client_ids: list[str], protocols: list[MQTTProtocolVersion]):
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients = [
            paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
            for client_id, protocol in zip(client_ids, protocols, strict=True)
        ]
        self.received: list[list[bytes]] = [[] for _ in self.clients]
        self.connected = 0
        self.subscribed = 0
        for index, client in enumerate(self.clients):
            client.on_message = self._on_message(index)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe

    def _on_message(self, index: int):
        def record(client, userdata, msg) -> None:
            self.received[index].append(msg.payload)

        return record

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.connected += not reason.is_failure

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.subscribed += 1

    def connect_all(self) -> None:
        for client in self.clients:
            client.connect("127.0.0.1", self.port, keepalive=60)
            self.selector.register(client.socket(), selectors.EVENT_READ, client)
        self.run_until(lambda: self.connected == len(self.clients), what="every CONNACK")

    def run_until(self, predicate: Callable[[], object], timeout_s: float = 20.0, what=""):
        deadline = time.monotonic() + timeout_s
        while True:
            for client in self.clients:
                if client.want_write():
                    client.loop_write()
            if predicate():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            for key, _ in self.selector.select(timeout=0.01):
                key.data.loop_read(max_packets=100)

    def close(self) -> None:
        for client in self.clients:
            sock = client.socket()
            if sock is not None:
                self.selector.unregister(sock)
            client.disconnect()  # written at once: no loop thread to hand it to
        self.selector.close()
