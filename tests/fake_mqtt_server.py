"""A fake MQTT 5 server that speaks just enough of the protocol to end a client's session with a
DISCONNECT of a chosen reason code, as a broker does on a session takeover (0x8E).

mosquitto 2.0.11 (Debian 12) closes a taken-over connection without that DISCONNECT, so tests of
what a client does on one need a server that sends it. This one accepts connections, answers
CONNECT with a CONNACK (success), PINGREQ with a PINGRESP, and once the first connection has
subscribed (the client is fully up) it sends DISCONNECT(reason) and closes that socket. Later
connections stay open and are only counted: a client that reconnects shows up there.
"""

from __future__ import annotations

import contextlib
import socket
import threading

CONNECT, SUBSCRIBE, PINGREQ = 0x1, 0x8, 0xC
CONNACK_SUCCESS = bytes([0x20, 0x03, 0x00, 0x00, 0x00])  # flags 0, reason 0, no properties
PINGRESP = bytes([0xD0, 0x00])


def disconnect_packet(reason_code: int) -> bytes:
    return bytes([0xE0, 0x02, reason_code, 0x00])  # reason code, no properties


class FakeMqttServer:
    def __init__(self, disconnect_reason: int) -> None:
        self.disconnect_reason = disconnect_reason
        self.connections = 0  # CONNECT packets received
        self.disconnect_sent = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeMqttServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(5)
        for sock in [*self._sockets, self._listener]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (packet_type := _read_packet(conn)) is not None:
                if packet_type == CONNECT:
                    self.connections += 1
                    conn.sendall(CONNACK_SUCCESS)
                elif packet_type == PINGREQ:
                    conn.sendall(PINGRESP)
                elif packet_type == SUBSCRIBE and not self.disconnect_sent.is_set():
                    conn.sendall(disconnect_packet(self.disconnect_reason))
                    self.disconnect_sent.set()
                    conn.close()
                    return


def _read_packet(conn: socket.socket) -> int | None:
    """The next packet's type (its body read and dropped); None when the peer closed."""
    first = _read_exactly(conn, 1)
    if first is None:
        return None
    length, shift = 0, 0
    while True:  # the remaining length: a variable byte integer
        byte = _read_exactly(conn, 1)
        if byte is None:
            return None
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        shift += 7
    if length and _read_exactly(conn, length) is None:
        return None
    return first[0] >> 4


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
