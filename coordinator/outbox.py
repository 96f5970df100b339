"""The coordinator's durable outbox: what the fleet state decided to send, until the broker has it.

A message is written in the same SQLite transaction as the state change that caused it (a job's
row and the job message commit together or not at all), handed to the MQTT bridge once per
actor life, and deleted when the bridge reports the broker's PUBACK for it. A restarted actor
hands out again every row not yet acknowledged: delivery to the broker is at-least-once, and the
device drops a repeat (a job by its id, an adapter by its version, the desired pointer is a
state). A job that expired while it waited is dropped, not sent: the device would refuse it.

Adapters are stored by reference (cohort, version, encoding) and read from the adapter store when
handed out: a rollout to a thousand devices writes a thousand small rows, not the arrays. So is
the adapter a desired pointer carries inline: the row holds the pointer and the reference, and
the pointer goes out with the adapter inside when it is at most INLINE_ADAPTER_MAX_BYTES (a
larger one the device fetches).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from coordinator.hot_rows import TransactionalNotes
from coordinator.outbound import DownlinkMessage, Outbound
from coordinator.state_db import StateDB
from shared.protocol import (
    INLINE_ADAPTER_MAX_BYTES,
    AdapterPublication,
    DecodeError,
    DesiredState,
    Job,
    adapter_wire_bytes,
    decode,
    encode,
)
from shared.protocol.envelope import new_message_id
from shared.protocol.wire import Fields, pack, unpack

log = logging.getLogger(__name__)

ADAPTER_REF = "adapter_ref"
DESIRED_WITH_ADAPTER = "desired_with_adapter"
ENVELOPE = "envelope"
HAND_OUT_LIMIT = 5_000  # rows per tick: a large rollout goes out over a few ticks
DELETE_CHUNK = 500  # acknowledged rows deleted per statement (SQLite allows 32,766 parameters)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT NOT NULL,
    form TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class AdapterRef:
    cohort: str
    version: int
    encoding: str


# (cohort, version, encoding) -> the publication, or None when that version is gone
AdapterResolver = Callable[[AdapterRef], AdapterPublication | None]


# Room in one publish for the pointer's own fields and the envelope around the inline adapter.
POINTER_HEADROOM_BYTES = 2048


class DurableOutbox:
    def __init__(
        self, db: StateDB, sender: str, clock: Callable[[], float], *, publish_limit: int
    ) -> None:
        self._db = db
        self._sender = sender
        self._clock = clock
        # A retained pointer must go out as one publish (a retained message is never chunked)
        self._inline_max = min(INLINE_ADAPTER_MAX_BYTES, publish_limit - POINTER_HEADROOM_BYTES)
        self._handed_through = 0  # the highest seq handed out in this actor's life
        # Messages added in this actor's life, by message id, until handed out: the row is the
        # durable copy, and decoding it again cost more than the rest of a job's dispatch.
        # A message whose transaction rolls back is forgotten with it.
        self._added: dict[str, DownlinkMessage] = {}
        self._added_ids = TransactionalNotes[str](
            db, commit=lambda ids: None, undo=self._forget_added
        )
        db.ensure_schema(_SCHEMA)

    def add(self, device_id: str, message: DownlinkMessage) -> bytes | None:
        """Joins the caller's transaction (if any): the row commits with the state change.
        Returns the message as encoded in the row (None for an adapter: a reference)."""
        if isinstance(message, AdapterPublication):
            ref = AdapterRef(message.cohort, message.version, message.encoding.value)
            self.add_adapter(device_id, ref)
            return None
        message_id = new_message_id()
        body = encode(message, sender=self._sender, message_id=message_id)
        self._insert(device_id, ENVELOPE, message_id, body)
        self._added[message_id] = message
        self._added_ids.note(message_id)
        return body

    def add_adapter(self, device_id: str, ref: AdapterRef) -> None:
        body = pack(_ref_fields(ref))
        self._insert(device_id, ADAPTER_REF, new_message_id(), body)

    def add_desired(self, device_id: str, pointer: DesiredState, ref: AdapterRef) -> bytes:
        """A pointer that carries the referenced adapter inline, if it is small enough.
        Returns the pointer as encoded in the row (without the adapter)."""
        message_id = new_message_id()
        envelope = encode(pointer, sender=self._sender, message_id=message_id)
        body = pack({**_ref_fields(ref), "pointer": envelope})
        self._insert(device_id, DESIRED_WITH_ADAPTER, message_id, body)
        self._added[message_id] = pointer
        self._added_ids.note(message_id)
        return envelope

    def _insert(self, device_id: str, form: str, message_id: str, body: bytes) -> None:
        self._db.execute(
            "INSERT INTO outbox (device_id, form, message_id, body, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (device_id, form, message_id, body, self._clock()),
        )

    def adapter_waiting(self, device_id: str, ref: AdapterRef) -> bool:
        """This adapter is in the outbox for the device and not handed out yet."""
        found = self._db.query_one(
            "SELECT 1 FROM outbox WHERE device_id = ? AND form = ? AND body = ? AND seq > ?",
            (device_id, ADAPTER_REF, pack(_ref_fields(ref)), self._handed_through),
        )
        return found is not None

    def newest_of(self, device_id: str) -> tuple[int, str] | None:
        """(seq, message id) of the device's newest row, or None."""
        row = self._db.query_one(
            "SELECT seq, message_id FROM outbox WHERE device_id = ? ORDER BY seq DESC LIMIT 1",
            (device_id,),
        )
        return None if row is None else (int(row["seq"]), str(row["message_id"]))

    def waiting(self, row: tuple[int, str]) -> bool:
        """This row is in the outbox and not handed out yet in this actor's life: it goes out
        after everything committed before the next hand-out."""
        seq, message_id = row
        if seq <= self._handed_through:
            return False
        found = self._db.query_one(
            "SELECT 1 FROM outbox WHERE seq = ? AND message_id = ?", (seq, message_id)
        )
        return found is not None

    def hand_out(self, resolve: AdapterResolver) -> list[Outbound]:
        """Rows not handed out in this actor's life, oldest first (at most HAND_OUT_LIMIT)."""
        rows = self._db.query(
            "SELECT * FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (self._handed_through, HAND_OUT_LIMIT),
        )
        if not rows:
            return []
        self._handed_through = rows[-1]["seq"]
        out, dropped = [], []
        resolve = _once_each(resolve)  # a rollout to many devices reads its version once
        inline = _once_each(_inline(resolve, self._inline_max))
        for row in rows:
            try:
                message = self._message(row, resolve, inline)
            except Exception:  # one row that cannot be built holds back no other
                # it stays in the outbox (not dropped, not handed out): the next actor life
                # tries it again; the rest of this hand-out goes out now
                log.exception("outbox row %s for %s could not be built; kept for the next "
                              "start", row["seq"], row["device_id"])  # fmt: skip
                continue
            if message is None:
                dropped.append(row["seq"])
                continue
            out.append(Outbound(row["device_id"], message, row["seq"], row["message_id"]))
        self.mark_sent(dropped)
        return out

    def _forget_added(self, message_ids: list[str]) -> None:
        for message_id in message_ids:
            self._added.pop(message_id, None)

    def mark_sent(self, seqs: Iterable[int]) -> None:
        """The broker acknowledged these (or they are not to be sent): forget them."""
        ordered = [int(s) for s in seqs]
        for start in range(0, len(ordered), DELETE_CHUNK):  # one statement per chunk of rows
            chunk = ordered[start : start + DELETE_CHUNK]
            marks = ", ".join("?" * len(chunk))
            self._db.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", chunk)

    def backlog(self) -> int:
        (row,) = self._db.query("SELECT COUNT(*) AS n FROM outbox")  # COUNT(*): always one row
        return int(row["n"])

    def _message(
        self, row: sqlite3.Row, resolve: AdapterResolver, inline: AdapterResolver
    ) -> DownlinkMessage | None:
        where = f"outbox row {row['seq']} for {row['device_id']}"
        try:
            if row["form"] == DESIRED_WITH_ADAPTER:
                fields = Fields(unpack(row["body"], max_bytes=65_536), where)
                added = self._added.pop(row["message_id"], None)
                return _with_adapter(fields, cast(DesiredState | None, added), inline)
            if row["form"] == ADAPTER_REF:
                ref = _ref_from(Fields(unpack(row["body"], max_bytes=4096), where))
                adapter = resolve(ref)
                if adapter is None:
                    log.warning("%s: adapter %s v%d is gone; not sent", where, ref.cohort,
                                ref.version)  # fmt: skip
                return adapter
            message = self._added.pop(row["message_id"], None)
            if message is None:  # added before this actor's life: read it back
                # only downlink messages are ever enqueued (add takes a DownlinkMessage)
                message = cast(DownlinkMessage, decode(row["body"]).message)
        except DecodeError as err:  # written by an older release, or damaged
            log.error("%s cannot be read (%s); not sent", where, err)
            return None
        if isinstance(message, Job) and message.is_expired(self._clock()):
            log.info("%s: job %s expired before it could be sent", where, message.job_id)
            return None
        return message


def _ref_fields(ref: AdapterRef) -> dict[str, object]:
    return {"cohort": ref.cohort, "version": ref.version, "encoding": str(ref.encoding)}


def _ref_from(f: Fields) -> AdapterRef:
    return AdapterRef(f.text("cohort"), f.integer("version"), f.text("encoding"))


def _inline(resolve: AdapterResolver, max_bytes: int) -> AdapterResolver:
    """The publication if it may travel inside a pointer (None: gone, or too large)."""

    def small_enough(ref: AdapterRef) -> AdapterPublication | None:
        adapter = resolve(ref)
        if adapter is None or adapter_wire_bytes(adapter) > max_bytes:
            return None
        return adapter

    return small_enough


def _with_adapter(f: Fields, added: DesiredState | None, inline: AdapterResolver) -> DesiredState:
    """The stored pointer (`added`: as added in this actor's life, else read back) with its
    adapter inside, or as it is (the device fetches it)."""
    pointer = added or cast(DesiredState, decode(f.blob("pointer")).message)
    adapter = inline(_ref_from(f))
    if adapter is None:
        return pointer
    try:
        return dataclasses.replace(pointer, adapter=adapter)
    except ValueError as err:  # not the version or base model the pointer names
        log.error("pointer for v%s sent without its adapter: %s", pointer.adapter_version, err)
        return pointer


def _once_each(resolve: AdapterResolver) -> AdapterResolver:
    found: dict[AdapterRef, AdapterPublication | None] = {}

    def cached(ref: AdapterRef) -> AdapterPublication | None:
        if ref not in found:
            found[ref] = resolve(ref)
        return found[ref]

    return cached
