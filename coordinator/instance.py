"""One coordinator per state dir: an exclusive lock held for the coordinator's whole life.

Two coordinators on one state dir (on two Rays, where the actor name cannot clash) would both
write its SQLite file and both claim its devices. The lock is flock(2) on `coordinator.lock`:
the kernel drops it when the process dies, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "coordinator.lock"
# A state dir the coordinator makes is its owner's alone: the fleet's records, report arrays
# and the API token are in it (a dir that exists keeps the mode its operator gave it)
STATE_DIR_MODE = 0o700


class InstanceConflict(RuntimeError):
    """Another coordinator runs this instance (its state dir, its actor): refuse to start."""


class StateDirLock:
    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        Path(state_dir).mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        path = Path(state_dir) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise InstanceConflict(
                f"another coordinator (pid {holder or 'unknown'}) runs on the state dir "
                f"{state_dir}: stop it first, or give this one its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(fd, path)

    def release(self) -> None:
        """Idempotent. Closing the descriptor drops the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
