"""Fleet versions this device measured and did not take (only_if_better), kept across restarts.

The desired-state pointer comes again at every reconnect: without this memory a device would
fetch and measure a version it declined every time. A decline holds for what ran when it was
made (the running adapter's slot, or the base model): once the device runs something else the
version is worth measuring again. Bounded: the latest LIMIT declines, in `declined.json`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

LIMIT = 32
BASE_MODEL = "base"  # the running key when no adapter runs


class DeclinedVersions:
    def __init__(self, path: Path):
        self._path = path
        self._lock = threading.Lock()
        self._entries: list[dict] = self._read()

    def has(self, version: int, running: str) -> bool:
        """Whether `version` was declined while `running` ran."""
        with self._lock:
            return any(e["version"] == version and e["running"] == running for e in self._entries)

    def add(self, version: int, running: str, accuracy_candidate: float,
            accuracy_running: float) -> None:  # fmt: skip
        entry = {"version": version, "running": running, "accuracy_candidate": accuracy_candidate,
                 "accuracy_running": accuracy_running}  # fmt: skip
        with self._lock:
            kept = [e for e in self._entries if (e["version"], e["running"]) != (version, running)]
            self._entries = [*kept, entry][-LIMIT:]
            self._write()

    def _read(self) -> list[dict]:
        try:
            entries = json.loads(self._path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as err:  # a lost memory only costs a re-measurement
            log.warning("declined versions in %s unreadable (%s): starting afresh", self._path, err)
            return []
        if not isinstance(entries, list) or not all(_valid(e) for e in entries):
            log.warning("declined versions in %s malformed: starting afresh", self._path)
            return []
        return entries[-LIMIT:]

    def _write(self) -> None:
        tmp = self._path.with_name(self._path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._entries, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)


def _valid(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("version"), int)
        and isinstance(entry.get("running"), str)
    )
