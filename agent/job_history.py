"""The job ids this device has accepted, persisted so a restart does not run a job twice.

An entry is only needed until its job expires: a re-delivered job past its expiry is rejected as
EXPIRED anyway. So entries are pruned a grace period after expiry, which bounds the file without
a size limit that could forget a live job id.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.protocol.enums import TERMINAL_STATES, JobState

log = logging.getLogger(__name__)

PRUNE_GRACE_SECONDS = 3600.0


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    expires_at: float
    state: JobState


class JobHistory:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self._path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._records = self._load()

    def _load(self) -> dict[str, JobRecord]:
        try:
            raw = json.loads(self._path.read_text())
            return {
                job_id: JobRecord(job_id, float(r["expires_at"]), JobState(r["state"]))
                for job_id, r in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # Writes are atomic, so this is outside damage. Keep serving: the worst case is
            # re-running a job that has not expired yet, which beats a device that never starts.
            aside = self._path.with_suffix(".corrupt")
            os.replace(self._path, aside)
            log.error("job history %s unreadable (%s); moved to %s", self._path, err, aside)
            return {}

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._records.get(job_id)

    def expiry_of(self, job_id: str) -> float | None:
        """The job's expires_at; None for a job this device never accepted."""
        record = self.get(job_id)
        return None if record is None else record.expires_at

    def record(self, job_id: str, expires_at: float, state: JobState) -> None:
        """Remember a job (on acceptance) or its new state; written to disk before returning."""
        with self._lock:
            self._records[job_id] = JobRecord(job_id, expires_at, state)
            self._prune()
            self._save()

    def unfinished(self) -> list[JobRecord]:
        """Jobs accepted but never finished: the agent stopped while they were queued or running."""
        with self._lock:
            return [r for r in self._records.values() if r.state not in TERMINAL_STATES]

    def _prune(self) -> None:
        horizon = self._clock() - PRUNE_GRACE_SECONDS
        for job_id in [j for j, r in self._records.items() if r.expires_at < horizon]:
            del self._records[job_id]

    def _save(self) -> None:
        data = {j: {**asdict(r), "state": r.state.value} for j, r in self._records.items()}
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)  # atomic: a crash leaves the old file or the new one
