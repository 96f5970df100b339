"""The bridge's queue of received device messages, taken by its inbound thread in batches.

queue.Queue wakes a waiting consumer on every put: the inbound thread, lingering for a small
batch to fill, woke once for each message that trickled in (an idle fleet's heartbeats: 10,000
devices beating every 30 s, 333 wake-ups a second, each a switch of the GIL between paho's
network thread and this one and a futex call on each side). Here the putter wakes the consumer
only when what it waits for has come: a first message, a batch filled up to `linger_below`, or
(while heartbeats alone linger) a message other than a heartbeat.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeGuard

from coordinator.delivery import AckToken
from coordinator.ingest import Received
from shared.protocol import MessageKind

Item = tuple[Received | None, AckToken]  # None: a message the decoder refused (acked in order)


def is_heartbeat(received: Received | None) -> TypeGuard[Received]:
    return received is not None and received.envelope.kind == MessageKind.HEARTBEAT


def is_event(item: Item) -> bool:
    """A device message other than a heartbeat (a refused one, None, asks for nothing)."""
    received = item[0]
    return received is not None and not is_heartbeat(received)


def events_in(items: Iterable[Item]) -> bool:
    return any(is_event(item) for item in items)


@dataclass(frozen=True)
class Linger:
    """How long a small batch waits for more before it goes: fewer than `below` messages wait
    `seconds` from the first; heartbeats alone wait `beats_seconds`, cut to `seconds` by any
    other message (a heartbeat is a state that only the next tick reads)."""

    below: int
    seconds: float
    beats_seconds: float


class Inbox:
    def __init__(self, linger: Linger, clock: Callable[[], float] = time.monotonic) -> None:
        self._linger = linger
        self._clock = clock
        self._items: deque[Item] = deque()
        self._changed = threading.Condition(threading.Lock())
        # What the waiting consumer waits for (None: it is not waiting): this many items
        # queued, or (with _wake_on_event) one that is an event
        self._wake_at: int | None = None
        self._wake_on_event = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item) -> None:
        with self._changed:
            self._items.append(item)
            wake_at = self._wake_at
            if wake_at is not None and (
                len(self._items) >= wake_at or (self._wake_on_event and is_event(item))
            ):
                self._wake_at = None
                self._changed.notify()

    def take(self, limit: int) -> list[Item]:
        """Up to `limit` queued items, oldest first, without waiting."""
        with self._changed:
            return self._pop(limit)

    def next_batch(
        self, first_wait_s: float, limit: int, stopping: Callable[[], bool]
    ) -> list[Item]:
        """Up to `limit` items: the first waited for up to first_wait_s ([] if none came), then,
        while the batch is small and `stopping()` is false, what comes within the linger."""
        with self._changed:
            if not self._items:
                self._wait(first_wait_s, wake_at=1, on_event=False)
            if not self._items:
                return []
            if len(self._items) < self._linger.below:
                self._linger_while_small(stopping)
            return self._pop(limit)

    def _linger_while_small(self, stopping: Callable[[], bool]) -> None:
        started = self._clock()
        short, below = self._linger.seconds, self._linger.below
        linger = short if events_in(self._items) else self._linger.beats_seconds
        while len(self._items) < below and not stopping():
            left = started + linger - self._clock()
            if left <= 0:
                return
            cut_by_event = linger > short
            self._wait(left, wake_at=below, on_event=cut_by_event)
            if cut_by_event and events_in(self._items):
                linger = short

    def _wait(self, timeout_s: float, *, wake_at: int, on_event: bool) -> None:
        """Called with the lock held: sleeps until put() sees what is asked for, or timeout."""
        self._wake_at, self._wake_on_event = wake_at, on_event
        try:
            self._changed.wait(timeout_s)
        finally:
            self._wake_at = None

    def _pop(self, limit: int) -> list[Item]:
        items = self._items
        return [items.popleft() for _ in range(min(limit, len(items)))]
