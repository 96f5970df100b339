"""What simulated devices need of their event loop: timers that never block it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Cancellable(Protocol):
    def cancel(self) -> object: ...


class Timers(Protocol):
    """asyncio's event loop is one: `call_later` and a monotonic `time`."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Cancellable: ...

    def time(self) -> float: ...


class Every:
    """Calls `tick` every `interval` seconds (the first after `first_delay`) until cancelled."""

    def __init__(
        self,
        timers: Timers,
        interval: float,
        tick: Callable[[], None],
        *,
        first_delay: float | None = None,
    ) -> None:
        self._timers = timers
        self._interval = interval
        self._tick = tick
        self._stopped = False
        delay = interval if first_delay is None else first_delay
        self._handle = timers.call_later(delay, self._fire)

    def _fire(self) -> None:
        if self._stopped:
            return
        self._handle = self._timers.call_later(self._interval, self._fire)
        self._tick()

    def cancel(self) -> None:
        self._stopped = True
        self._handle.cancel()
