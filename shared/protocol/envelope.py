"""The envelope every message travels in. All its fields live inside the payload (not in MQTT v5
properties), so the protocol works on MQTT 3.1.1 brokers too."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from shared.protocol import checks
from shared.protocol.enums import DEVICE_KINDS, MessageKind
from shared.protocol.messages import (
    AdapterPublication,
    Chunk,
    DesiredState,
    FetchRequest,
    Heartbeat,
    Job,
    JobStatus,
    Message,
    Presence,
    Report,
)
from shared.topics import validate_device_id

SCHEMA_VERSION = 1
MESSAGE_TYPES: dict[MessageKind, type] = {
    MessageKind.PRESENCE: Presence,
    MessageKind.HEARTBEAT: Heartbeat,
    MessageKind.JOB: Job,
    MessageKind.JOB_STATUS: JobStatus,
    MessageKind.REPORT: Report,
    MessageKind.ADAPTER: AdapterPublication,
    MessageKind.DESIRED: DesiredState,
    MessageKind.FETCH: FetchRequest,
    MessageKind.CHUNK: Chunk,
}
_KIND_OF_TYPE = {cls: kind for kind, cls in MESSAGE_TYPES.items()}


def new_message_id() -> str:
    """128 random bits as 32 hex digits, as uuid4().hex but without building a UUID (a fifth
    of its cost: every message a coordinator or an agent sends takes one)."""
    return os.urandom(16).hex()


def kind_of(message: Message) -> MessageKind:
    try:
        return _KIND_OF_TYPE[type(message)]
    except KeyError:
        raise ValueError(f"{type(message).__name__} is not a protocol message") from None


def _reply_topic(value: object) -> None:
    checks.text(value, "reply_to", 256)
    topic = str(value)  # checks.text passed: it is a str
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"reply_to must be a topic name without wildcards, got {value!r}")


@dataclass(frozen=True)
class Envelope:
    """A message plus who sent it, when, and how to deduplicate and answer it."""

    message: Message
    sender: str  # a device id, or the coordinator's id (same alphabet)
    message_id: str = field(default_factory=new_message_id)
    sent_at: float = field(default_factory=time.time)
    expires_at: float | None = None  # unix seconds; also the MQTT v5 message expiry
    reply_to: str | None = None  # topic for the answer (v5 response topic)
    correlation_id: str | None = None  # id of the request this answers (v5 correlation data)
    boot_id: str | None = None  # device messages: (sender, boot_id, seq) is the idempotency key
    seq: int | None = None

    def __post_init__(self) -> None:
        kind = kind_of(self.message)
        validate_device_id(self.sender)
        checks.token(self.message_id, "message_id", checks.MESSAGE_ID)
        checks.number(self.sent_at, "sent_at", 0.0)
        if self.expires_at is not None:
            checks.number(self.expires_at, "expires_at", 0.0)
        if self.reply_to is not None:
            _reply_topic(self.reply_to)
        if self.correlation_id is not None:
            checks.token(self.correlation_id, "correlation_id")
        if (self.boot_id is None) != (self.seq is None):
            raise ValueError("boot_id and seq go together")
        if self.boot_id is not None:
            checks.token(self.boot_id, "boot_id")
            checks.integer(self.seq, "seq")
        elif kind in DEVICE_KINDS:
            raise ValueError(f"a {kind} message needs boot_id and seq")

    @property
    def kind(self) -> MessageKind:
        return kind_of(self.message)

    @property
    def dedup_key(self) -> tuple[str, str, int] | None:
        """(sender, boot_id, seq) for device messages: seen before means a duplicate delivery."""
        if self.boot_id is None:
            return None
        assert self.seq is not None  # __post_init__ checked: a boot_id comes with a seq
        return (self.sender, self.boot_id, self.seq)

    def is_expired(self, now: float | None = None) -> bool:
        if self.expires_at is None:
            return False
        return (time.time() if now is None else now) >= self.expires_at
