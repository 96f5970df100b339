"""The per-device TCP proxy, with plain sockets: forwarding, refuse, blackhole and restore."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from skipfleet.brokers import free_port
from skipfleet.fleet.base import CutMode
from skipfleet.fleet.proxy import ProxyLoop, TcpProxy

QUIET_S = 0.3  # how long "nothing arrives" is watched for: a bound, never a correctness sleep


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes everything; counts accepted connections, closed ones and bytes received."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.accepted = self.closed = self.received = 0
        self.changed = threading.Condition()

    def note(self, **deltas: int) -> None:
        with self.changed:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            self.changed.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, timeout), "condition not met in time"


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.note(accepted=1)
        try:
            while data := self.request.recv(4096):
                self.server.note(received=len(data))
                self.request.sendall(data)
        except OSError:
            pass
        finally:
            self.server.note(closed=1)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxies(caplog) -> Iterator[ProxyLoop]:
    runner = ProxyLoop()
    yield runner
    runner.close()
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
    assert not errors, f"the proxies' event loop logged errors: {errors}"


def connect(proxy: TcpProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return recv_exactly(sock, len(payload))


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def ended(sock: socket.socket) -> bool:
    """True if the peer closed or reset the connection (read within the socket's timeout)."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def refused(proxy: TcpProxy) -> bool:
    """A new connection is reset: at once, or (loopback is fast) during the handshake."""
    try:
        with connect(proxy) as sock:
            return ended(sock)
    except ConnectionResetError:
        return True


def silent(sock: socket.socket) -> bool:
    """True if nothing (no data, no close) arrives for QUIET_S."""
    sock.settimeout(QUIET_S)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(5)
    return False


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_forwards_both_ways(proxies, echo):
    proxy = proxies.open(*echo.server_address, name="dev-1")
    with connect(proxy) as sock:
        assert roundtrip(sock, b"hello broker") == b"hello broker"
        assert proxy.live_connections == 1 and proxy.mode is None


def test_refuse_resets_live_and_new_connections_until_restore(proxies, echo):
    proxy = proxies.open(*echo.server_address)
    live = connect(proxy)
    assert roundtrip(live) == b"ping"
    proxy.cut(CutMode.REFUSE)
    assert ended(live), "the device's live connection must be closed"
    echo.wait(lambda: echo.closed == 1)  # the broker side is told at once too
    assert refused(proxy)
    assert echo.accepted == 1, "nothing may reach the broker while cut"
    proxy.restore()
    with connect(proxy) as again:
        assert roundtrip(again) == b"ping"
    live.close()


def test_blackhole_freezes_live_connections_and_swallows_new_ones(proxies, echo):
    proxy = proxies.open(*echo.server_address)
    live = connect(proxy)
    assert roundtrip(live) == b"ping"
    proxy.cut(CutMode.BLACKHOLE)
    live.sendall(b"held")
    assert silent(live), "a blackhole answers nothing and closes nothing"
    assert echo.received == 4 and echo.closed == 0, "the broker must not hear of it either"
    late = connect(proxy)
    late.sendall(b"CONNECT")
    assert silent(late)
    assert echo.accepted == 1
    proxy.restore()
    # The frozen connection resumes with what was held; the swallowed one is reset.
    assert recv_exactly(live, 4) == b"held"
    assert ended(late)
    with connect(proxy) as fresh:
        assert roundtrip(fresh) == b"ping"
    live.close()
    late.close()


def test_a_client_giving_up_inside_the_blackhole_is_forgotten(proxies, echo):
    proxy = proxies.open(*echo.server_address)
    proxy.cut(CutMode.BLACKHOLE)
    with connect(proxy):
        wait_until(lambda: proxy.live_connections == 1)
    wait_until(lambda: proxy.live_connections == 0)


def test_refuse_after_blackhole_ends_the_frozen_connections(proxies, echo):
    proxy = proxies.open(*echo.server_address)
    with connect(proxy) as live:
        assert roundtrip(live) == b"ping"
        proxy.cut(CutMode.BLACKHOLE)
        assert silent(live)
        proxy.cut(CutMode.REFUSE)
        assert ended(live)
        echo.wait(lambda: echo.closed == 1)
        assert proxy.mode is CutMode.REFUSE


def test_upstream_down_looks_like_a_refused_connection(proxies):
    proxy = proxies.open("127.0.0.1", free_port())
    assert refused(proxy)


def test_many_proxies_share_one_loop_and_fail_independently(proxies, echo):
    one, two = proxies.open(*echo.server_address), proxies.open(*echo.server_address)
    with connect(one) as a, connect(two) as b:
        one.cut(CutMode.REFUSE)
        assert ended(a)
        assert roundtrip(b) == b"ping"
    assert one.port != two.port
