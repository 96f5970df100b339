"""Which device messages the fleet state has applied already: de-duplication in the actor.

The bridge acknowledges a device message (PUBACK) only after the actor committed it, so the
device's outbox, the broker and a restarted coordinator may all deliver it again. A message whose
effect must happen once (a job status, a report, a fetch) is remembered in SQLite, in the same
transaction as its effect: applied and remembered together, or neither. Heartbeats and presence
are states, not events; applying a late copy again is harmless, so they are remembered in memory
only (a bounded LRU that catches the common QoS 1 re-delivery) and never fill the database.

The key is (device, boot id, sequence number) for device messages, else the message id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from coordinator.hot_rows import TransactionalNotes
from coordinator.state_db import StateDB
from shared.protocol import Envelope, MessageKind

# Kept this long: longer than a device's outbox keeps re-sending (its spool rows live until
# PUBACK; a device offline for longer than this may have a report applied twice, which the job
# table then refuses as a report for a finished job).
KEEP_S = 7 * 24 * 3600.0
EVENT_KINDS = frozenset({MessageKind.JOB_STATUS, MessageKind.REPORT, MessageKind.FETCH})
STATE_CAPACITY = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_messages (
    key TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_messages_by_age ON seen_messages (at);
"""


def message_key(envelope: Envelope) -> str:
    key = envelope.dedup_key
    if key is None:
        return f"id|{envelope.message_id}"
    sender, boot_id, seq = key
    return f"{sender}|{boot_id}|{seq}"


class SeenMessages:
    def __init__(self, db: StateDB, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        self._states: OrderedDict[str, None] = OrderedDict()
        # a state message remembered in a transaction that rolls back is forgotten again, so
        # applying it again (an ingest batch message by message) does not drop it as a repeat
        self._remembered = TransactionalNotes[str](db, commit=lambda keys: None, undo=self._forget)
        db.ensure_schema(_SCHEMA)

    def first_time(self, envelope: Envelope) -> bool:
        """True the first time a message is seen (and remembers it); False for a repeat.
        Call it inside the transaction that applies the message."""
        key = message_key(envelope)
        if envelope.kind not in EVENT_KINDS:
            return self._first_state(key)
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO seen_messages (key, at) VALUES (?, ?)", (key, self._clock())
        )
        return inserted == 1

    def first_report(self, device_id: str, job_id: str) -> bool:
        """True the first time a report for this job is handled (and remembers it). An agent
        never sends a second one (a kept report goes again unchanged: first_time drops it), so
        a second is a device replaying a job id under a new seq. Same table, same horizon."""
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO seen_messages (key, at) VALUES (?, ?)",
            (f"report|{device_id}|{job_id}", self._clock()),
        )
        return inserted == 1

    def prune(self) -> int:
        return self._db.execute("DELETE FROM seen_messages WHERE at < ?", (self._clock() - KEEP_S,))

    def _first_state(self, key: str) -> bool:
        if key in self._states:
            self._states.move_to_end(key)
            return False
        self._states[key] = None
        self._remembered.note(key)
        if len(self._states) > STATE_CAPACITY:
            self._states.popitem(last=False)
        return True

    def _forget(self, keys: list[str]) -> None:
        for key in keys:
            self._states.pop(key, None)
