"""A round's report arrays, appended to one file per round and removed when the round ends.

Only the round's aggregation reads a report's arrays, and only after a restart or past the
memory cap (reports are held in memory from receipt). In their SQLite rows they cost the actor
about a tenth of its CPU a round: the blob's overflow pages, written to the WAL at commit,
copied again at each checkpoint, then zeroed or freed by the release (~130 MB a 10,000-device
round, written twice). Here each report is one `write()` to its round's file, its row keeps
where (offset, length), and the round's release is one `unlink()`.

Durability: the write is made before the row's transaction commits, so a committed row's arrays
are in the file for any later process (a crash of this one loses nothing). Like the state db
(WAL, synchronous=NORMAL), neither is synced at each commit: after a power loss a committed row
may name bytes that never reached the disk, and that report then reads as unreadable (it fails
its device in the round, not the round). A transaction that rolls back leaves its bytes in the
file, named by no row, until the round's file goes.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
from pathlib import Path

FOLDER = "round-arrays"
_MAX_ID_BYTES = 100  # a name holds the id's hex: ~210 characters, under any file system's 255
# <round id in hex>.<8 random hex digits>.arrays: a file a round gets each time one is opened
# for it (a report after the round's end, a restart), so a row never names a newer file's bytes
_NAME = re.compile(r"([0-9a-f]+)\.[0-9a-f]{8}\.arrays")


class ArraysGone(Exception):
    """The arrays named by a row are not in their round's file; the message says why."""


class RoundArrayFiles:
    """Appends and reads report arrays in files per round under `state_dir/round-arrays`."""

    def __init__(self, state_dir: str | Path) -> None:
        self._folder = Path(state_dir) / FOLDER
        self._lock = threading.Lock()  # an offset is the file's size just before its write
        self._names: dict[str, str] = {}  # round -> the file this process appends to

    def append(self, round_id: str, blob: bytes) -> tuple[str, int]:
        """Writes `blob` at the end of the round's file; returns the file's name and the
        offset the blob starts at, for read()."""
        with self._lock:
            name = self._names.get(round_id) or self._new_name(round_id)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            try:
                fd = os.open(self._folder / name, flags, 0o600)
            except FileNotFoundError:  # the folder: made at the first report, not before
                self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self._folder / name, flags, 0o600)
            try:
                offset = os.fstat(fd).st_size
                view = memoryview(blob)
                while view:  # a regular file takes it whole, short of a full disk (OSError)
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            self._names[round_id] = name
        return name, offset

    def read(self, name: str, offset: int, length: int) -> bytes:
        """The `length` bytes at `offset` of the file `name` (as append() gave it); ArraysGone
        if they are not there."""
        if _NAME.fullmatch(name) is None:  # a damaged or edited row: no other path is read
            raise ArraysGone(f"{name!r} is not a round's arrays file")
        path = self._folder / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ArraysGone(f"{path} is gone (its round ended, or it was removed)") from None
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise ArraysGone(f"{path} has {len(data)} of the {length} bytes at {offset:,}")
        return data

    def remove(self, round_id: str) -> None:
        """Removes the round's files (OSError if one cannot be); a later append opens a new one."""
        with self._lock:
            self._names.pop(round_id, None)
            for path in self._files().get(round_id, []):
                path.unlink(missing_ok=True)

    def rounds(self) -> set[str]:
        """The rounds that have a file."""
        return set(self._files())

    def _files(self) -> dict[str, list[Path]]:
        found: dict[str, list[Path]] = {}
        if not self._folder.is_dir():
            return found
        for entry in self._folder.iterdir():
            match = _NAME.fullmatch(entry.name)
            try:
                round_id = bytes.fromhex(match.group(1)).decode() if match else None
            except ValueError:  # odd hex digits, or not UTF-8 (UnicodeDecodeError is one)
                round_id = None
            if round_id is not None:
                found.setdefault(round_id, []).append(entry)
        return found

    @staticmethod
    def _new_name(round_id: str) -> str:
        raw = round_id.encode()
        if not raw or len(raw) > _MAX_ID_BYTES:
            raise ValueError(f"a round id of 1 to {_MAX_ID_BYTES} bytes, not {len(raw)}")
        return f"{raw.hex()}.{secrets.token_hex(4)}.arrays"
