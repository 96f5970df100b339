"""A round's report arrays, appended to one file per round and removed when the round ends.

Only the round's aggregation reads a report's arrays, and only after a restart or past the
memory cap (reports are held in memory from receipt). In their SQLite rows they cost the fleet
state ~0.1 ms a device a round (in process: 0.65-0.74 ms a device stored so, 0.55-0.61 if none):
the blob's overflow pages, written to the WAL at commit, copied again at each checkpoint, then
freed by the release (~130 MB a 10,000-device round, written twice). Here each report is one
`write()` to its round's file, its row keeps where (file, offset, length), and the round's
release is one `unlink()`.

Durability: the write is made before the row's transaction commits, so a committed row's arrays
are in the file for any later process (a crash of the coordinator loses nothing). Neither is
synced at each commit: the state db (WAL, synchronous=NORMAL) reaches the disk at its
checkpoints, the files written since the last sync at each scan (every 5 s: sync()) and at a
clean stop. After a power loss a committed row may name bytes of its last seconds that never
reached the disk: that report reads as unreadable (it fails its device in the round, not the
round). A write that fails (a full disk) is cut back off the file and raised as StorageFailed:
the batch fails whole and is not acknowledged, so the broker delivers it again. A transaction
that rolls back leaves its bytes in the file, named by no row, until the round's file goes.
"""

from __future__ import annotations

import contextlib
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
_NO_LINKS = getattr(os, "O_NOFOLLOW", 0)  # a link in the folder is not followed


class ArraysGone(Exception):
    """The arrays named by a row are not in their round's file; the message says why."""


class StorageFailed(Exception):
    """A report's arrays could not be written (a full disk, an I/O error): the batch that
    carried it must fail whole, unacknowledged, not lose the report."""


class RoundArrayFiles:
    """Appends and reads report arrays in files per round under `state_dir/round-arrays`."""

    def __init__(self, state_dir: str | Path) -> None:
        self._folder = Path(state_dir) / FOLDER
        self._lock = threading.Lock()  # an offset is the file's size just before its write
        self._names: dict[str, str] = {}  # round -> the file this process appends to
        # file -> its descriptor, kept open for the next append: an open and a close a report
        # were ~1-2 % of the fleet actor's CPU in a 10,000-device round (py-spy)
        self._appending: dict[str, int] = {}
        self._unsynced: set[str] = set()  # files written since the last sync()
        self._made = False  # a file made since the last sync(): the folder's entries too

    def append(self, round_id: str, blob: bytes) -> tuple[str, int]:
        """Writes `blob` at the end of the round's file; returns the file's name and the
        offset the blob starts at, for read(). StorageFailed if it cannot be written."""
        with self._lock:
            name = self._names.get(round_id)
            if name is None:  # this process's first report of the round: a file of its own
                name = self._new_name(round_id)
                self._made = True
            try:
                fd, offset = self._append_at(name)
            except OSError as err:
                raise StorageFailed(f"cannot open {self._folder / name}: {err}") from err
            try:
                _write_all(fd, blob, offset)
            except OSError as err:
                raise StorageFailed(f"cannot write {self._folder / name}: {err}") from err
            self._names[round_id] = name
            self._unsynced.add(name)
        return name, offset

    def read(self, round_id: str, name: str, offset: object, length: object) -> bytes:
        """The `length` bytes at `offset` of the round's file `name` (as append() gave them);
        ArraysGone if the row's values do not name bytes of that round's file."""
        match = _NAME.fullmatch(name) if isinstance(name, str) else None
        if match is None or match.group(1) != round_id.encode().hex():
            raise ArraysGone(f"{name!r} is not a file of round {round_id}'s arrays")
        path = self._folder / name
        try:
            fd = os.open(path, os.O_RDONLY | _NO_LINKS)
        except FileNotFoundError:
            raise ArraysGone(f"{path} is gone (its round ended, or it was removed)") from None
        try:
            size = os.fstat(fd).st_size
            span = _span(offset, length, size)
            if span is None:  # a damaged row: never a read past the file (or a huge buffer)
                why = f"bytes {offset!r}+{length!r} of {path} ({size:,} bytes)"
                raise ArraysGone(f"the row names {why}, not a report's arrays")
            data = os.pread(fd, span[1], span[0])
        finally:
            os.close(fd)
        if len(data) != span[1]:
            raise ArraysGone(f"{path} gave {len(data)} of the {span[1]} bytes at {span[0]:,}")
        return data

    def sync(self) -> None:
        """Makes what was written since the last call durable (fdatasync: a scan's, a stop's),
        and the names of files made since (the folder's fsync). OSError if one fails: what it
        had to sync is kept for the next call."""
        with self._lock:
            names, self._unsynced = self._unsynced, set()
            made, self._made = self._made, False
        try:
            if made:
                _sync_folder(self._folder)
            for name in names:
                try:
                    fd = os.open(self._folder / name, os.O_RDONLY | _NO_LINKS)
                except FileNotFoundError:  # released since
                    continue
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError:
            with self._lock:
                self._unsynced |= names
                self._made |= made
            raise

    def close(self) -> None:
        """Closes the files kept open for appends (a later append opens its file again)."""
        with self._lock:
            for fd in self._appending.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._appending.clear()

    def remove(self, round_ids: list[str]) -> None:
        """Removes these rounds' files (OSError if one cannot be); a later append for one of
        them opens a new file."""
        with self._lock:
            files = self._files()
            for round_id in round_ids:
                name = self._names.pop(round_id, None)
                if name is not None:  # its descriptor, even if its file is gone already
                    self._stop_appending(name)
                for path in files.get(round_id, []):
                    self._stop_appending(path.name)
                    path.unlink(missing_ok=True)

    def rounds(self) -> set[str]:
        """The rounds that have a file."""
        return set(self._files())

    def _append_at(self, name: str) -> tuple[int, int]:
        """The file's descriptor for appends (kept open) and its size: where a blob goes. A
        file unlinked under it (not by remove(), which closes it first) is made anew, as an
        open by name would: appends to a file that no name reaches would be lost."""
        fd = self._appending.get(name)
        if fd is not None:
            stat = os.fstat(fd)
            if stat.st_nlink > 0:
                return fd, stat.st_size
            self._stop_appending(name)
            self._made = True  # its new entry in the folder: synced with the next sync()
        fd = self._open_for_append(name)
        self._appending[name] = fd
        return fd, os.fstat(fd).st_size

    def _stop_appending(self, name: str) -> None:
        fd = self._appending.pop(name, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _open_for_append(self, name: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NO_LINKS
        try:
            return os.open(self._folder / name, flags, 0o600)
        except FileNotFoundError:  # the folder: made at the first report, not before
            self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._folder / name, flags, 0o600)
            _sync_folder(self._folder.parent)  # the new folder's entry in the state dir
            return fd

    def _files(self) -> dict[str, list[Path]]:
        """Each round's files (regular files only: a link or folder of that name is skipped)."""
        found: dict[str, list[Path]] = {}
        if not self._folder.is_dir():
            return found
        with os.scandir(self._folder) as entries:
            for entry in entries:
                match = _NAME.fullmatch(entry.name)
                if match is None or not entry.is_file(follow_symlinks=False):
                    continue
                try:
                    round_id = bytes.fromhex(match.group(1)).decode()
                except ValueError:  # odd hex digits, or not UTF-8 (UnicodeDecodeError is one)
                    continue
                found.setdefault(round_id, []).append(Path(entry.path))
        return found

    @staticmethod
    def _new_name(round_id: str) -> str:
        raw = round_id.encode()
        if not raw or len(raw) > _MAX_ID_BYTES:
            raise ValueError(f"a round id of 1 to {_MAX_ID_BYTES} bytes, not {len(raw)}")
        return f"{raw.hex()}.{secrets.token_hex(4)}.arrays"


def _span(offset: object, length: object, size: int) -> tuple[int, int] | None:
    """(offset, length) if a row's values name bytes inside a file of `size` bytes."""
    if type(offset) is not int or type(length) is not int:  # None, a bool, a float: damaged
        return None
    return (offset, length) if offset >= 0 and 0 < length <= size - offset else None


def _write_all(fd: int, blob: bytes, offset: int) -> None:
    """All of `blob`, or none of it: a failed write is cut back off the file (best effort)."""
    view = memoryview(blob)
    try:
        while view:  # a regular file takes it whole, short of a full disk (OSError)
            view = view[os.write(fd, view) :]
    except OSError:
        with contextlib.suppress(OSError):  # else the bytes stay, named by no row
            os.ftruncate(fd, offset)
        raise


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
