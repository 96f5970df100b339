"""The bridge's bookkeeping of delivery, both ways, kept out of paho's callbacks' way.

Outbound (PublishTracker): an outbox row goes out as one or more publishes (chunks); it is
settled when the broker acknowledged every one of them (PUBACK), and only then does the actor
delete the row. paho may call on_publish before publish() has returned the mid, so the network
thread only records acknowledged mids, and the control thread matches them.

Inbound (InboundAcks): a device message is acknowledged to the broker only after the actor
committed it. A message id (mid) is only meaningful on the connection it arrived on: a message
that arrived before a reconnect is never acknowledged (the broker delivers it again, and the
actor drops the repeat).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class PublishTracker:
    def __init__(self) -> None:
        self._parts_left: dict[int, int] = {}  # outbox seq -> publishes not yet acknowledged
        self._seq_of_mid: dict[int, int] = {}
        self._acked_mids: deque[int] = deque()  # appended by paho's thread, read by ours
        self._early: list[int] = []

    def holds(self, seq: int) -> bool:
        """Published and not yet acknowledged: paho re-sends it itself after a reconnect."""
        return seq in self._parts_left

    def published(self, seq: int, mids: Iterable[int]) -> None:
        mids = list(mids)
        if not mids:
            raise ValueError(f"outbox row {seq}: published as no message")
        self._parts_left[seq] = len(mids)
        for mid in mids:
            self._seq_of_mid[mid] = seq

    def on_puback(self, mid: int) -> None:
        """paho's network thread: only a deque append (thread-safe, never blocks)."""
        self._acked_mids.append(mid)

    def settled(self) -> list[int]:
        """Outbox rows every publish of which the broker acknowledged since the last call."""
        done, early = [], []
        for mid in [*self._early, *self._drain()]:
            seq = self._seq_of_mid.pop(mid, None)
            if seq is None:
                early.append(mid)  # acknowledged before published() recorded it
                continue
            self._parts_left[seq] -= 1
            if self._parts_left[seq] == 0:
                del self._parts_left[seq]
                done.append(seq)
        # An early mid is matched by the next call at the latest; one that is not is no publish
        # of ours (e.g. the probe's), and is forgotten.
        self._early = [mid for mid in early if mid not in self._early]
        return done

    def _drain(self) -> list[int]:
        mids = []
        while self._acked_mids:
            mids.append(self._acked_mids.popleft())
        return mids

    def in_flight(self) -> int:
        return len(self._parts_left)


@dataclass(frozen=True)
class AckToken:
    mid: int
    qos: int
    connection: int  # which connection it arrived on


class InboundAcks:
    def __init__(
        self,
        send_ack: Callable[[int, int], object],
        send_qos1_acks: Callable[[list[int]], object] | None = None,
    ) -> None:
        self._send_ack = send_ack  # paho's client.ack(mid, qos)
        # A batch of QoS 1 acknowledgements in one go (LeanClient.ack_many), if the client can.
        self._send_qos1_acks = send_qos1_acks
        self._connection = 0
        self._lock = threading.Lock()

    def connected(self) -> None:
        """A new connection: acknowledgements owed on the last one are void."""
        with self._lock:
            self._connection += 1

    def token(self, mid: int, qos: int) -> AckToken:
        with self._lock:
            return AckToken(mid, qos, self._connection)

    def ack(self, tokens: Iterable[AckToken]) -> int:
        """Acknowledges the QoS 1 messages of the current connection; returns how many."""
        with self._lock:
            current = self._connection
        owed = [token for token in tokens if token.qos > 0 and token.connection == current]
        if self._send_qos1_acks is None:
            for token in owed:
                self._send_ack(token.mid, token.qos)
            return len(owed)
        self._send_qos1_acks([token.mid for token in owed if token.qos == 1])
        for token in owed:
            if token.qos > 1:
                self._send_ack(token.mid, token.qos)
        return len(owed)
