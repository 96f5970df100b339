"""Per-device TCP proxies between agents and the broker, so one link can be cut for real.

Every agent of a process fleet connects to its own proxy port instead of the broker, so the
network of ONE device (or of the broker, by cutting every proxy) can fail and come back while
both processes keep running. Two ways to fail, `CutMode`:

- `refuse`: live connections are reset (RST) on both sides, new ones are accepted and reset.
  The broker sees the socket close at once and publishes the device's Will.
- `blackhole`: live connections freeze: what is read is held, nothing is forwarded, nothing is
  closed, so neither side learns anything until MQTT keepalive gives up (a dead Wi-Fi link).
  New connections are accepted and swallowed: whatever the client sends goes nowhere.

`restore()` un-freezes live connections, whose held bytes and EOFs then flow as TCP would
deliver them after the outage, and resets the swallowed ones: they never reached the broker,
and replaying a CONNECT that the client gave up on would take over its newer session.

All proxies of a fleet share one event loop in one thread (`ProxyLoop`); their public methods
are thread-safe and block until done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from skipfleet.fleet.base import CutMode

log = logging.getLogger(__name__)
CHUNK = 65536


class ProxyLoop:
    """An asyncio loop in a daemon thread, hosting any number of `TcpProxy`."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._proxies: list[TcpProxy] = []
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="skipfleet-proxies", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def open(self, upstream_host: str, upstream_port: int, *, name: str = "",
             listen_host: str = "127.0.0.1", listen_port: int = 0) -> TcpProxy:  # fmt: skip
        """Start a proxy to upstream; `listen_port=0` picks a free port (see `.port`)."""
        proxy = TcpProxy(self, (upstream_host, upstream_port), name)
        self.call(proxy._start(listen_host, listen_port))
        self._proxies.append(proxy)
        return proxy

    def close(self) -> None:
        if self._loop.is_closed():
            return
        for proxy in self._proxies:
            proxy.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()


@dataclass(eq=False)
class _Link:
    """One accepted client connection and, once opened, its upstream connection."""

    client: asyncio.StreamWriter
    task: asyncio.Task
    upstream: asyncio.StreamWriter | None = None
    swallowed: bool = False  # accepted during a blackhole: never forwarded

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _reset(writer)
        # Wake a handler parked on the gate or a read; never cancel oneself: a handler task
        # that ends cancelled makes asyncio.streams log an error.
        if self.task is not asyncio.current_task():
            self.task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: what a refused or broken connection looks like to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream`, until cut. Made by `ProxyLoop.open`."""

    def __init__(self, runner: ProxyLoop, upstream: tuple[str, int], name: str) -> None:
        self.upstream = upstream
        self.name = name
        self.port = 0
        self._runner = runner
        self._mode: CutMode | None = None
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._open: asyncio.Event | None = None  # set while not cut; made inside the loop

    @property
    def mode(self) -> CutMode | None:
        """None while forwarding, else how it is cut."""
        return self._mode

    @property
    def live_connections(self) -> int:
        return len(self._links)

    def cut(self, mode: CutMode = CutMode.BLACKHOLE) -> None:
        self._runner.call(self._cut(CutMode(mode)))

    def restore(self) -> None:
        self._runner.call(self._restore())

    def close(self) -> None:
        if self._server is not None:
            self._runner.call(self._close())

    # -- inside the loop ---------------------------------------------------------------------
    async def _start(self, host: str, port: int) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self, mode: CutMode) -> None:
        self._mode = mode
        self._open.clear()
        if mode is CutMode.REFUSE:  # also ends connections frozen by an earlier blackhole
            for link in list(self._links):
                link.reset()

    async def _restore(self) -> None:
        if self._mode is None:
            return
        self._mode = None
        for link in list(self._links):
            if link.swallowed:
                link.reset()
        self._open.set()

    async def _close(self) -> None:
        self._server.close()
        links = list(self._links)
        for link in links:
            link.reset()
        # Let the handlers run their `finally` before the loop may stop.
        await asyncio.gather(*(link.task for link in links), return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, asyncio.current_task())
        self._links.add(link)
        try:
            await self._handle(link, reader)
        except asyncio.CancelledError:
            pass  # reset by a cut or close; the sockets are already gone
        except Exception as err:  # a broken peer must not end up in the loop's error log
            log.debug("proxy %s: connection ended: %r", self.name, err)
            link.reset()
        finally:
            self._links.discard(link)
            for end in (link.client, link.upstream):
                if end is not None:
                    end.close()

    async def _handle(self, link: _Link, reader: asyncio.StreamReader) -> None:
        if self._mode is CutMode.REFUSE:
            link.reset()
            return
        if self._mode is CutMode.BLACKHOLE:
            link.swallowed = True
            while await reader.read(CHUNK):
                pass  # until the client gives up (EOF) or restore/refuse resets it
            return
        try:
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            link.reset()  # broker down: the client sees a refused connection, as without us
            return
        async with asyncio.TaskGroup() as group:
            group.create_task(self._pump(reader, link.upstream))
            group.create_task(self._pump(up_reader, link.client))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(CHUNK)
            # Frozen while cut: hold what was read, EOF included, as a stalled TCP path would.
            await self._open.wait()
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()
