"""Each finished job's result, kept after the broker took it, for the coordinator to ask again.

A broker's PUBACK is not delivery: a mosquitto SIGKILLed before it wrote its sessions to disk
(`autosave_interval`) comes back without them, and what it had accepted for the coordinator is
gone while the spool row was already deleted. So the messages that end a job (its report, its
terminal status) are also kept here, in the spool's database and in the transaction that spools
them: kept if and only if spooled. When the coordinator sends the job again (agent.repeats), the
kept payloads are spooled again byte for byte: the same (boot id, seq), so the coordinator's
de-duplication applies them once, whichever copy arrives first.

Bounds: a result is kept until its job's expiry (coordinator clock, as the job runner estimates
it) plus KEEP_MARGIN_SECONDS: by then the coordinator has timed the job out and asks no more.
And at most `max_jobs` results and `max_bytes` of payload: past either, the oldest results go
first (a re-ask of such a job then gets the job runner's REJECTED duplicate, as before).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.spool import AlsoInTransaction, Spool
from shared.protocol.enums import TERMINAL_STATES
from shared.protocol.messages import JobStatus, Message, Report

log = logging.getLogger(__name__)

KEEP_MARGIN_SECONDS = 600.0  # beyond the expiry: the coordinator's clock and ours may differ
MAX_KEPT_JOBS = 64
MAX_KEPT_BYTES = 32 * 1024 * 1024

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS kept_results (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        qos INTEGER NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS kept_results_by_job ON kept_results (job_id, id)",
)


@dataclass(frozen=True)
class KeptPublish:
    topic: str
    payload: bytes
    qos: int


def result_job_id(message: Message) -> str | None:
    """The job a message ends or reports on (a report, a terminal status); None otherwise."""
    if isinstance(message, Report):
        return message.job_id
    if isinstance(message, JobStatus) and message.state in TERMINAL_STATES:
        return message.job_id
    return None


class KeptResults:
    def __init__(
        self,
        spool: Spool,
        expiry_of: Callable[[str], float | None],
        *,
        max_jobs: int = MAX_KEPT_JOBS,
        max_bytes: int = MAX_KEPT_BYTES,
        clock: Callable[[], float] = time.time,
    ):
        if max_jobs < 1 or max_bytes < 1:
            raise ValueError("kept results bounds must be positive")
        self._spool = spool
        self._expiry_of = expiry_of  # the job's expires_at, None for a job never accepted
        self._max_jobs = max_jobs
        self._max_bytes = max_bytes
        self._clock = clock
        spool.run(_create_schema)

    def keeping(self, message: Message, topic: str, payloads: list[bytes], qos: int) -> (
        AlsoInTransaction | None
    ):  # fmt: skip
        """What keeps this message in the spooling transaction, or None if it is not a result
        (or answers a job this device never accepted, e.g. an undecodable command)."""
        job_id = result_job_id(message)
        expires_at = None if job_id is None else self._expiry_of(job_id)
        if job_id is None or expires_at is None:
            return None

        def keep(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO kept_results (job_id, topic, payload, qos, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(job_id, topic, payload, qos, expires_at) for payload in payloads],
            )
            self._prune(db)

        return keep

    def of(self, job_id: str) -> list[KeptPublish]:
        """The job's kept publishes, in the order they were spooled (empty: none kept)."""
        rows = self._spool.run(
            lambda db: db.execute(
                "SELECT topic, payload, qos FROM kept_results WHERE job_id = ? ORDER BY id",
                (job_id,),
            ).fetchall()
        )
        return [KeptPublish(topic, bytes(payload), qos) for topic, payload, qos in rows]

    def jobs(self) -> list[str]:
        """The jobs whose results are kept, oldest first."""
        rows = self._spool.run(
            lambda db: db.execute(
                "SELECT job_id FROM kept_results GROUP BY job_id ORDER BY MIN(id)"
            ).fetchall()
        )
        return [job_id for (job_id,) in rows]

    def _prune(self, db: sqlite3.Connection) -> None:
        db.execute(
            "DELETE FROM kept_results WHERE expires_at < ?",
            (self._clock() - KEEP_MARGIN_SECONDS,),
        )
        while True:
            jobs, size = db.execute(
                "SELECT COUNT(DISTINCT job_id), COALESCE(SUM(LENGTH(payload)), 0) FROM kept_results"
            ).fetchone()
            if jobs <= self._max_jobs and size <= self._max_bytes:
                return
            (oldest,) = db.execute("SELECT job_id FROM kept_results ORDER BY id LIMIT 1").fetchone()
            log.info("no longer keeping the result of job %s (bounds: %d jobs, %d bytes)",
                     oldest, self._max_jobs, self._max_bytes)  # fmt: skip
            db.execute("DELETE FROM kept_results WHERE job_id = ?", (oldest,))


def _create_schema(db: sqlite3.Connection) -> None:
    for statement in SCHEMA:  # one by one: executescript would commit the open transaction
        db.execute(statement)
