"""Everything the device sends: stamped with (boot id, seq), encoded, chunked, spooled.

The receiver drops duplicates by (device, boot id, seq): the outbox may deliver a message twice
(a PUBACK lost with the connection), never zero times while the spool holds it. The boot id is
random per process start, so sequence numbers can restart at 0 without colliding with the last
boot's, even if the state dir was wiped. A job's result (report, terminal status) is kept as
spooled (agent.kept_results), so a re-sent copy carries the same (boot id, seq) as the first.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Callable

from agent.kept_results import KeptPublish, KeptResults
from agent.spool import Priority, Spool
from shared.mqtt import check_publish_size
from shared.protocol import DEFAULT_CHUNK_LIMIT, Outgoing, encode_for_publish, kind_of
from shared.protocol.messages import Message
from shared.protocol.routing import topic_kind_for
from shared.topics import TopicKind, Topics


def new_boot_id() -> str:
    return uuid.uuid4().hex[:16]


class Uplink:
    def __init__(
        self,
        device_id: str,
        topics: Topics,
        spool: Spool,
        *,
        boot_id: str,
        chunk_limit: int = DEFAULT_CHUNK_LIMIT,
        on_spooled: Callable[[], None] = lambda: None,
        keeper: KeptResults | None = None,
    ):
        self.device_id = device_id
        self.boot_id = boot_id
        self._topics = topics
        self._spool = spool
        self._chunk_limit = chunk_limit
        self._on_spooled = on_spooled
        self._keeper = keeper
        self._seq = itertools.count()
        self._seq_lock = threading.Lock()

    def next_seq(self) -> int:
        with self._seq_lock:
            return next(self._seq)

    def encode(self, message: Message) -> list[Outgoing]:
        """One publish, or its chunks; each at most the chunk limit (checked, not assumed)."""
        outgoing = encode_for_publish(
            message,
            sender=self.device_id,
            limit=self._chunk_limit,
            boot_id=self.boot_id,
            seq=self.next_seq(),
        )
        for item in outgoing:
            check_publish_size(item.payload, self._chunk_limit)
        return outgoing

    def topic_for(self, message: Message) -> tuple[str, TopicKind]:
        kind = topic_kind_for(kind_of(message))
        return self._topics.topic(self.device_id, kind), kind

    def send(self, message: Message) -> None:
        """Spool a message for delivery; raises SpoolFull for a record that does not fit."""
        topic, kind = self.topic_for(message)
        priority = Priority.TELEMETRY if kind is TopicKind.TELEMETRY else Priority.RECORD
        payloads = [item.payload for item in self.encode(message)]
        keeper = self._keeper
        keep = keeper.keeping(message, topic, payloads, kind.qos) if keeper else None
        self._spool.put_all(topic, payloads, priority=priority, qos=kind.qos, also=keep)
        self._on_spooled()

    def send_again(self, kept: list[KeptPublish]) -> None:
        """Spool kept publishes again as they are (their stamps unchanged: applied once);
        raises SpoolFull if the spool has no room for them."""
        start = 0
        for end in range(1, len(kept) + 1):  # consecutive publishes on one topic: one put
            if end == len(kept) or kept[end].topic != kept[start].topic:
                payloads = [item.payload for item in kept[start:end]]
                self._spool.put_all(kept[start].topic, payloads, priority=Priority.RECORD,
                                    qos=kept[start].qos)  # fmt: skip
                start = end
        self._on_spooled()
