"""Moves spooled messages to the broker and deletes each one only when its PUBACK arrives.

A small window of messages is in flight at a time (paho's own in-flight limit is 20 by default;
more would only pile up in paho's memory). The outbox runs on its own thread, woken when a
message is spooled, when an acknowledgement frees a slot, or when the connection comes up.

Each row is handed to paho once per client (the agent's life): paho keeps every QoS 1 message
it was given until its PUBACK, across reconnects, and re-sends it itself (DUP) after each
CONNACK. Handing it over again after an outage would put a second copy on the wire for every
row in flight. The one exception is a v5 PUBACK "quota exceeded": paho forgets the message then,
so the row is handed over again after `retry_after_seconds`.

paho calls `on_publish` while holding its internal message lock, and `publish()` takes the same
lock; so the outbox never calls paho while holding its own lock, and a PUBACK that arrives before
`publish()` has even returned its mid (possible with the network loop on another thread) is
remembered in `_early_acks` instead of being waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.spool import Spool, SpoolItem

log = logging.getLogger(__name__)

# Publishes one spooled message; returns paho's mid if the client took it, None if it did not
# (queue full, or QoS 0 while disconnected), in which case it stays in the spool for later.
PublishFn = Callable[[SpoolItem], "int | None"]


EARLY_ACK_TTL = 10.0  # seconds


@dataclass(frozen=True)
class OutboxStats:
    in_flight: int
    refused_for_good: int  # rows dropped: the broker (v5 PUBACK) or paho refused them for good


@dataclass
class _InFlight:
    spool_id: int
    sent_at: float


class Outbox:
    def __init__(
        self,
        spool: Spool,
        publish: PublishFn,
        *,
        window: int = 16,
        retry_after_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if window < 1:
            raise ValueError("window must be >= 1")
        self._spool = spool
        self._publish = publish
        self._window = window
        self._retry_after = retry_after_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[int, _InFlight] = {}  # mid -> spooled message
        # mid -> (accepted, when): acknowledged before publish() returned its mid
        self._early_acks: dict[int, tuple[bool | None, float]] = {}
        # spool id -> when to hand it over again: rows paho dropped without the broker taking them
        self._retry_at: dict[int, float] = {}
        self.handed_over = 0  # publishes handed to paho (each row once, unless paho dropped it)
        self._refused = 0
        self._connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- events from the transport (its MQTT worker, agent.handoff) ---------------------------
    def connected(self) -> None:
        self._connected.set()
        self.notify()

    def disconnected(self) -> None:
        # In-flight messages stay recorded: paho re-sends them itself after reconnecting.
        self._connected.clear()

    def acknowledged(self, mid: int, accepted: bool | None) -> None:
        """PUBACK for `mid`: `accepted` False when a v5 broker refused it for good, None when it
        refused it for now (quota exceeded: paho forgot it, it is handed over again later)."""
        with self._lock:
            entry = self._in_flight.get(mid)
            if entry is None:
                self._early_acks[mid] = (accepted, self._clock())
                return
        # The entry stays in flight until its row is deleted (or marked for retry): a pump in
        # between would otherwise find the row still spooled and not in flight, and send it again.
        self._outcome(entry.spool_id, accepted)
        with self._lock:
            self._in_flight.pop(mid, None)
        self.notify()

    def _outcome(self, spool_id: int, accepted: bool | None) -> None:
        if accepted is None:
            with self._lock:
                self._retry_at[spool_id] = self._clock() + self._retry_after
            return
        self._settle(spool_id, accepted)

    def notify(self) -> None:
        self._wake.set()

    # -- the pump ------------------------------------------------------------------------------
    def pump(self) -> int:
        """Hand as many spooled messages to the client as the window allows; returns how many."""
        if not self._connected.is_set():
            return 0
        with self._lock:
            self._forget_old_early_acks()
            free = self._window - len(self._in_flight)
            busy = {entry.spool_id for entry in self._in_flight.values()} | self._waiting()
        if free <= 0:
            return 0
        sent = 0
        for item in self._spool.pending(free, exclude=busy):
            try:
                mid = self._publish(item)
            except ValueError as err:  # paho refuses this row for good (topic, size)
                log.error("cannot publish spooled message %d: %s", item.id, err)
                self._settle(item.id, accepted=False)
                continue
            if mid is None:
                break  # the client refused (queue full or just disconnected): try later
            self._record(mid, item.id)
            self.handed_over += 1
            sent += 1
        return sent

    def _record(self, mid: int, spool_id: int) -> None:
        with self._lock:
            self._retry_at.pop(spool_id, None)
            early = self._early_acks.pop(mid, None)
            if early is None:
                self._in_flight[mid] = _InFlight(spool_id, self._clock())
                return
        self._outcome(spool_id, early[0])

    def _settle(self, spool_id: int, accepted: bool) -> None:
        if not accepted:
            # Not authorized, payload invalid, ...: re-sending would be refused again.
            log.error("broker refused spooled message %d; dropping it", spool_id)
            with self._lock:
                self._refused += 1
        self._spool.ack(spool_id)

    def _waiting(self) -> set[int]:
        """Rows paho dropped (quota exceeded) whose retry time has not come (lock held)."""
        now = self._clock()
        for spool_id in [i for i, at in self._retry_at.items() if at <= now]:
            del self._retry_at[spool_id]
        return set(self._retry_at)

    def _forget_old_early_acks(self) -> None:
        # A real early ack is claimed within microseconds; an old one is no publish of ours
        # and must not settle a later message that reuses its mid.
        now = self._clock()
        for mid in [m for m, (_, t) in self._early_acks.items() if now - t > EARLY_ACK_TTL]:
            del self._early_acks[mid]

    def stats(self) -> OutboxStats:
        with self._lock:
            return OutboxStats(in_flight=len(self._in_flight), refused_for_good=self._refused)

    # -- thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            # Also wake periodically: a row paho dropped is handed over again even when idle.
            self._wake.wait(timeout=min(5.0, self._retry_after))
            self._wake.clear()
            try:
                while self.pump() > 0 and not self._stop.is_set():
                    pass
            except Exception:  # the pump must survive a bad row or a closed client
                log.exception("outbox pump failed; retrying on the next wake-up")
                self._stop.wait(1.0)
