"""Which message kinds belong on which topic, so neither side hard-codes the pairing."""

from __future__ import annotations

from shared.protocol.enums import MessageKind
from shared.protocol.envelope import Envelope
from shared.protocol.errors import DecodeError
from shared.topics import UPLINK, TopicKind

TOPIC_OF_KIND: dict[MessageKind, TopicKind] = {
    MessageKind.PRESENCE: TopicKind.STATUS,
    MessageKind.HEARTBEAT: TopicKind.TELEMETRY,
    MessageKind.JOB_STATUS: TopicKind.JOB,
    MessageKind.REPORT: TopicKind.REPORT,
    MessageKind.FETCH: TopicKind.FETCH,
    MessageKind.JOB: TopicKind.CMD_JOB,
    MessageKind.ADAPTER: TopicKind.CMD_ADAPTER,
    MessageKind.DESIRED: TopicKind.CMD_DESIRED,
}
# Large messages may arrive as chunks on the topic of the message they carry.
_CHUNKED_TOPICS = frozenset({TopicKind.REPORT, TopicKind.CMD_ADAPTER})


def topic_kind_for(kind: MessageKind) -> TopicKind:
    """The topic a message kind is published on (a Chunk goes where its message goes)."""
    if kind is MessageKind.CHUNK:
        raise ValueError("a chunk is published on the topic of the message it carries")
    return TOPIC_OF_KIND[kind]


def check_route(device_id: str, topic_kind: TopicKind, envelope: Envelope) -> None:
    """Refuse a message on the wrong topic, or a device message sent under another device's id."""
    kind = envelope.kind
    allowed = kind is MessageKind.CHUNK and topic_kind in _CHUNKED_TOPICS
    if not allowed and TOPIC_OF_KIND.get(kind) is not topic_kind:
        raise DecodeError(f"a {kind} message does not belong on {topic_kind}")
    if topic_kind in UPLINK and envelope.sender != device_id:
        raise DecodeError(f"{envelope.sender!r} published on the topic of {device_id!r}")
