"""Splitting envelopes that exceed one publish (128 KB: the AWS IoT limit, and what mosquitto's
max_packet_size is set against) into Chunk messages, and putting them back together.

Each chunk is an envelope of its own, at most `limit` bytes encoded. The receiver keeps partial
messages in bounded memory, accepts chunks in any order and more than once (QoS 1 redelivers),
verifies the sha256 of the whole, and can say which indices are missing so a sender can resume.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.protocol.codec import MAX_MESSAGE_BYTES, decode, encode_envelope, new_envelope
from shared.protocol.envelope import Envelope
from shared.protocol.errors import EncodeError, ReassemblyError
from shared.protocol.messages import MAX_CHUNKS, Chunk, Message

DEFAULT_CHUNK_LIMIT = 131_072
_BIN_HEADER_GROWTH = 3  # the probe's 1-byte data has a 2-byte bin8 header; bin32 needs 5
_MIN_PIECE = 64


@dataclass(frozen=True)
class Outgoing:
    """One publish: the envelope (for MQTT v5 properties) and its encoded bytes."""

    envelope: Envelope
    payload: bytes


def _chunk_envelope(original: Envelope, chunk: Chunk) -> Envelope:
    # Chunks inherit only the expiry (so the broker drops stale pieces); reply routing and the
    # (boot_id, seq) idempotency key stay on the inner envelope the receiver reassembles.
    return Envelope(chunk, sender=original.sender, expires_at=original.expires_at)


def _piece_size(original: Envelope, limit: int) -> int:
    largest_header = Chunk(original.message_id, MAX_CHUNKS - 1, MAX_CHUNKS, bytes(32), b"x")
    overhead = len(encode_envelope(_chunk_envelope(original, largest_header))) - 1
    piece = limit - overhead - _BIN_HEADER_GROWTH
    if piece < _MIN_PIECE:
        raise ValueError(f"chunk limit {limit} leaves no room for data after {overhead} bytes")
    return piece


def split_envelope(envelope: Envelope, payload: bytes, *, limit: int) -> list[Outgoing]:
    """Chunk envelopes, each at most `limit` bytes, carrying `payload` (the encoded envelope)."""
    piece = _piece_size(envelope, limit)
    total = math.ceil(len(payload) / piece)
    if total > MAX_CHUNKS:
        raise EncodeError(f"{len(payload)} bytes need {total} chunks, over {MAX_CHUNKS}")
    digest = hashlib.sha256(payload).digest()
    out = []
    for index in range(total):
        data = payload[index * piece : (index + 1) * piece]
        chunk = Chunk(envelope.message_id, index, total, digest, data)
        chunk_env = _chunk_envelope(envelope, chunk)
        encoded = encode_envelope(chunk_env)
        if len(encoded) > limit:  # the overhead estimate is exact for our headers; guard it
            raise EncodeError(f"chunk {index} is {len(encoded)} bytes, over {limit}")
        out.append(Outgoing(chunk_env, encoded))
    return out


def encode_for_publish(
    message: Message, *, sender: str, limit: int = DEFAULT_CHUNK_LIMIT, **headers: object
) -> list[Outgoing]:
    """Encode a message as one publish, or as chunks when it is over `limit` bytes."""
    envelope = new_envelope(message, sender=sender, **headers)
    payload = encode_envelope(envelope)
    if len(payload) <= limit:
        return [Outgoing(envelope, payload)]
    return split_envelope(envelope, payload, limit=limit)


@dataclass
class _Partial:
    total: int
    sha256: bytes
    started_at: float
    pieces: dict[int, bytes] = field(default_factory=dict)
    size: int = 0


class Reassembler:
    """Collects chunks per message id; bounded in messages, bytes and time.

    When full, the oldest partial message is dropped (counted in `dropped`): its sender resumes
    by re-sending the indices `missing()` reports, or the whole message.
    """

    def __init__(
        self,
        *,
        max_in_flight: int = 8,
        max_total_bytes: int = 4 * MAX_MESSAGE_BYTES,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_total_bytes = max_total_bytes
        self.max_message_bytes = max_message_bytes
        self.ttl_s = ttl_s
        self.dropped = 0
        self._clock = clock
        self._partials: OrderedDict[str, _Partial] = OrderedDict()  # oldest first
        self._completed: OrderedDict[str, None] = OrderedDict()  # late duplicates to ignore
        self._bytes = 0

    @property
    def in_flight(self) -> list[str]:
        return list(self._partials)

    @property
    def buffered_bytes(self) -> int:
        return self._bytes

    def missing(self, message_id: str) -> list[int]:
        """Indices not received yet for a message in flight (KeyError if none is)."""
        partial = self._partials[message_id]
        return [i for i in range(partial.total) if i not in partial.pieces]

    def expire(self) -> list[str]:
        """Drop partial messages older than the TTL; returns their ids."""
        deadline = self._clock() - self.ttl_s
        stale = [mid for mid, p in self._partials.items() if p.started_at <= deadline]
        for message_id in stale:
            self._drop(message_id)
        return stale

    def add(self, chunk: Chunk) -> bytes | None:
        """Store a chunk; returns the whole verified payload when it is the last one missing."""
        self.expire()
        if chunk.message_id in self._completed:
            return None
        partial = self._partial_for(chunk)
        if chunk.index in partial.pieces:
            return None
        self._reserve(chunk.message_id, partial, len(chunk.data))
        partial.pieces[chunk.index] = chunk.data
        partial.size += len(chunk.data)
        self._bytes += len(chunk.data)
        if len(partial.pieces) < partial.total:
            return None
        return self._complete(chunk.message_id, partial)

    def feed(self, envelope: Envelope) -> Envelope | None:
        """Pass non-chunk envelopes through; decode a chunked message once it is complete."""
        if not isinstance(envelope.message, Chunk):
            return envelope
        chunk = envelope.message
        payload = self.add(chunk)
        if payload is None:
            return None
        inner = decode(payload, max_bytes=self.max_message_bytes)
        if isinstance(inner.message, Chunk) or inner.message_id != chunk.message_id:
            raise ReassemblyError(f"chunks of {chunk.message_id} carry a different message")
        return inner

    def _partial_for(self, chunk: Chunk) -> _Partial:
        partial = self._partials.get(chunk.message_id)
        if partial is None:
            while len(self._partials) >= self.max_in_flight:
                self._drop(next(iter(self._partials)))
            partial = _Partial(chunk.total, chunk.sha256, self._clock())
            self._partials[chunk.message_id] = partial
        elif (partial.total, partial.sha256) != (chunk.total, chunk.sha256):
            self._drop(chunk.message_id)
            raise ReassemblyError(f"chunks of {chunk.message_id} disagree on total or sha256")
        return partial

    def _reserve(self, message_id: str, partial: _Partial, size: int) -> None:
        if partial.size + size > self.max_message_bytes:
            self._drop(message_id)
            raise ReassemblyError(f"message {message_id} exceeds {self.max_message_bytes} bytes")
        others = (mid for mid in list(self._partials) if mid != message_id)
        while self._bytes + size > self.max_total_bytes:
            victim = next(others, None)
            if victim is None:
                self._drop(message_id)
                raise ReassemblyError(f"message {message_id} does not fit the reassembly buffer")
            self._drop(victim)

    def _complete(self, message_id: str, partial: _Partial) -> bytes:
        payload = b"".join(partial.pieces[i] for i in range(partial.total))
        self._forget(message_id)
        if hashlib.sha256(payload).digest() != partial.sha256:
            raise ReassemblyError(f"message {message_id} failed its sha256 check")
        self._completed[message_id] = None
        while len(self._completed) > 1024:
            self._completed.popitem(last=False)
        return payload

    def _forget(self, message_id: str) -> None:
        partial = self._partials.pop(message_id)
        self._bytes -= partial.size

    def _drop(self, message_id: str) -> None:
        self._forget(message_id)
        self.dropped += 1

    def drop_oldest(self) -> None:
        """Drops the oldest partial message (counted in `dropped`)."""
        if self._partials:
            self._drop(next(iter(self._partials)))


class SenderReassemblers:
    """One Reassembler per sender, so one device's chunks can only ever evict its own partial
    messages; a global byte cap evicts from whichever sender holds the most (the hog pays).

    The coordinator hears thousands of devices through one of these. Idle senders cost nothing:
    a sender's reassembler goes once it holds no partial message.
    """

    def __init__(
        self,
        *,
        per_sender_in_flight: int = 4,
        per_sender_bytes: int = 2 * MAX_MESSAGE_BYTES,
        max_total_bytes: int = 16 * MAX_MESSAGE_BYTES,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        ttl_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make: Callable[[], Reassembler] = lambda: Reassembler(
            max_in_flight=per_sender_in_flight,
            max_total_bytes=per_sender_bytes,
            max_message_bytes=max_message_bytes,
            ttl_s=ttl_s,
            clock=clock,
        )
        self.max_total_bytes = max_total_bytes
        self._by_sender: dict[str, Reassembler] = {}
        self._dropped_gone = 0  # dropped by senders whose reassembler is gone

    @property
    def dropped(self) -> int:
        return self._dropped_gone + sum(r.dropped for r in self._by_sender.values())

    @property
    def buffered_bytes(self) -> int:
        return sum(r.buffered_bytes for r in self._by_sender.values())

    def in_flight(self, sender: str) -> list[str]:
        reassembler = self._by_sender.get(sender)
        return [] if reassembler is None else reassembler.in_flight

    def feed(self, envelope: Envelope) -> Envelope | None:
        """As Reassembler.feed, with the sender's own reassembler."""
        if not isinstance(envelope.message, Chunk):
            return envelope
        sender = envelope.sender
        reassembler = self._by_sender.get(sender) or self._by_sender.setdefault(
            sender, self._make()
        )
        try:
            whole = reassembler.feed(envelope)
        finally:
            self._evict_over_cap()
            self._forget_idle(sender)
        return whole

    def _evict_over_cap(self) -> None:
        while self.buffered_bytes > self.max_total_bytes:
            hog = max(self._by_sender.values(), key=lambda r: r.buffered_bytes)
            hog.drop_oldest()

    def _forget_idle(self, sender: str) -> None:
        reassembler = self._by_sender.get(sender)
        if reassembler is not None and not reassembler.in_flight:
            self._dropped_gone += reassembler.dropped
            del self._by_sender[sender]
