"""Running the broker: `serve()` on the current event loop, or `MiniBroker`, which runs it on a
background thread for a program (or test) that is not itself asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TypeVar

from skipfleet.minibroker.broker import Broker
from skipfleet.minibroker.config import BrokerConfig, BrokerStats
from skipfleet.minibroker.connection import ClientConnection

log = logging.getLogger("skipfleet.minibroker")
T = TypeVar("T")
LISTEN_BACKLOG = 1024  # a fleet reconnecting at once should queue, not be refused


async def serve(
    host: str,
    port: int,
    config: BrokerConfig,
    *,
    stop: asyncio.Event,
    on_listening: Callable[[Broker, int], None] | None = None,
) -> None:
    """Listen on host:port (0: any free port) until `stop` is set, then drop every client."""
    loop = asyncio.get_running_loop()
    broker = Broker(config, loop)
    server = await loop.create_server(
        lambda: ClientConnection(broker), host, port, backlog=LISTEN_BACKLOG
    )
    bound_port = server.sockets[0].getsockname()[1]
    log.info("minibroker listening on %s:%d", host, bound_port)
    if on_listening is not None:
        on_listening(broker, bound_port)
    try:
        await stop.wait()
    finally:
        server.close()
        for connection in list(broker.connections):
            connection.shut_down()
        await asyncio.sleep(0)  # run the connection_lost() callbacks the aborts scheduled
        await server.wait_closed()


class MiniBroker:
    """An MQTT 3.1.1 / 5 broker on a background thread.

    with MiniBroker("127.0.0.1") as broker:     # port 0: a free port, see broker.port
        run_fleet(f"mqtt://127.0.0.1:{broker.port}")
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        config: BrokerConfig | None = None,
        users: Mapping[str, str] | None = None,
        max_packet_size: int | None = None,
    ) -> None:
        config = config or BrokerConfig()
        if users is not None:
            config = replace(config, users=users)
        if max_packet_size is not None:
            config = replace(config, max_packet_size=max_packet_size)
        self.host, self.config = host, config
        self._requested_port = port
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._broker: Broker | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> MiniBroker:
        """Start listening; returns once clients can connect (raises if it cannot bind)."""
        if self._thread is not None:
            raise RuntimeError("MiniBroker already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="minibroker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"minibroker did not start within {timeout_s} s")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        try:
            loop.run_until_complete(
                serve(
                    self.host,
                    self._requested_port,
                    self.config,
                    stop=self._stop,
                    on_listening=self._listening,
                )
            )
        except BaseException as error:  # reported to start(), which re-raises it
            self._startup_error = error
        finally:
            self._ready.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _listening(self, broker: Broker, port: int) -> None:
        self._broker, self.port = broker, port
        self._ready.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Disconnect every client and stop listening. Safe to call twice."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        self._thread = None
        self._broker = None

    def stats(self, timeout_s: float = 5.0) -> BrokerStats:
        """Counters and sizes, read on the broker's own thread."""
        return self.call(lambda broker: broker.stats(), timeout_s)

    def call(self, function: Callable[[Broker], T], timeout_s: float = 5.0) -> T:
        """Run `function(broker)` on the broker's thread and return its result (for tests and
        diagnostics: the broker's state is only ever touched from that thread)."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None:
            raise RuntimeError("MiniBroker is not running")

        async def on_loop() -> T:
            return function(broker)

        return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout_s)

    def __enter__(self) -> MiniBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
