"""Asking devices again for their open jobs: what a crashed broker may have lost.

A broker's PUBACK is not delivery. A mosquitto SIGKILLed before its autosave comes back without
the sessions, and what it had accepted for them is gone: a device's report it acknowledged to
the device (whose spool then let it go), or a job command it acknowledged to us. So each job's
command is remembered here, in the transaction that puts it in the outbox, until the job's
deadline, and the commands of the open jobs (QUEUED, IN_PROGRESS) are sent again through the
durable outbox:
- when a device comes online: every agent connection publishes a new presence after it has
  subscribed, so the device can receive what is sent in answer. Not while the device's last
  ask still waits in the outbox, unsent: that copy goes out after this presence anyway, so a
  device flapping its presence gets one copy per hand-out, not one per presence (Fleet.reask);
- when the bridge connects without a session (CONNACK session present false): the open jobs of
  every device. A device not yet back (no session on the broker) misses that copy, and is asked
  again by its own presence when it is.
A job offered by a retained desired pointer (an APPLY_ADAPTER offer) is asked again with that
pointer, as long as it is the device's latest (an older one sent again would replace a newer).
The agent answers a job it finished with the result it kept, unchanged (the fleet state applies
it once: coordinator.seen), one it runs with IN_PROGRESS, one it never got by running it
(agent.repeats). Asking costs messages only on reconnects, none in a normal round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from coordinator.jobs import Job as JobRecord
from coordinator.state_db import StateDB
from shared.protocol import DecodeError, DesiredState, Job, decode, encode

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS job_commands (
    job_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    pointer INTEGER NOT NULL,
    body BLOB NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS job_commands_by_expiry ON job_commands (expires_at);
CREATE INDEX IF NOT EXISTS job_commands_by_device ON job_commands (device_id, pointer);
"""
Command = Job | DesiredState  # a job command, or the retained pointer that offers one


class JobCommands:
    """The command of every job until its deadline (when the job table times it out)."""

    def __init__(self, db: StateDB, sender: str, clock: Callable[[], float]) -> None:
        self._db = db
        self._sender = sender
        self._clock = clock
        db.ensure_schema(_SCHEMA)

    def remember(self, device_id: str, command: Command, encoded: bytes | None = None) -> None:
        """A job sent, or a retained pointer: it replaces the device's last pointer (asking
        with an older one would put it back over the newer), and is kept if it offers a job.
        Joins the caller's transaction (with the outbox row that sends it). `encoded`: the
        command as the outbox encoded it (only its message is read back), else encoded here."""
        pointer = isinstance(command, DesiredState)
        if pointer:
            self._db.execute(
                "DELETE FROM job_commands WHERE device_id = ? AND pointer = 1", (device_id,)
            )
        job = command.apply_job() if isinstance(command, DesiredState) else command
        if job is None:
            return
        self._db.execute(
            "INSERT OR REPLACE INTO job_commands (job_id, device_id, pointer, body, expires_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (job.job_id, device_id, int(pointer),
             encoded or encode(command, sender=self._sender), job.expires_at),
        )  # fmt: skip

    def of(self, jobs: Iterable[JobRecord]) -> list[tuple[str, Command]]:
        """(device, command) of each of these jobs whose command is known and not expired."""
        found = []
        now = self._clock()
        for record in jobs:
            row = self._db.query_one(
                "SELECT device_id, body FROM job_commands WHERE job_id = ? AND expires_at > ?",
                (record.job_id, now),
            )
            if row is None:
                continue
            try:
                command = decode(row["body"]).message
            except DecodeError as err:  # written by an older release, or damaged
                log.error("job %s: its command cannot be read (%s); not asked again",
                          record.job_id, err)  # fmt: skip
                continue
            if isinstance(command, Job | DesiredState):
                found.append((str(row["device_id"]), command))
        return found

    def prune(self) -> int:
        """Forgets the commands of jobs past their deadline; how many."""
        return self._db.execute("DELETE FROM job_commands WHERE expires_at <= ?", (self._clock(),))
