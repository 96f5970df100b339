"""Fine-tune reports: checked on receipt, their arrays kept on disk until their round ends.

A round may close after the actor restarted, so reports cannot live in memory only: each one's
row goes to SQLite, committed with the batch that applied the report, and its arrays (msgpack,
each array in the wire protocol's form: shared.protocol.arrays) to the end of its round's file
before that commit (coordinator.round_arrays), the row saying where. Only a round's aggregation
reads the arrays. Once the round has ended (its aggregates stored, every cluster stopped, or it
failed) they are dropped from memory, and its file once the transaction that ended it commits
(release); the periodic scan drops any left (a report that came after its round ended, an
earlier version's). A device's own fine-tune outside any round is never aggregated: it keeps no
arrays. The rows, with every other column, stay: the API's device views list them.
Earlier versions of the coordinator wrote the arrays to a file `reports/<job_id>.npz` each, the
row naming it, then as a .npz or msgpack blob in the row; all are still read. (A file per report
cost 0.1-0.8 ms of file creation a report here; a .npz blob ~0.06 ms to write and ~1.2 ms to
read back through np.load, the msgpack one ~0.015 and ~0.02 ms; a blob in the row, with its
overflow pages through the WAL and its checkpoints, ~0.1 ms of the actor's CPU a device a
round in all.)
A cohort's adapter shape (layer widths, class count) is taken from its first accepted report;
every later report must match it, so a wrong-sized adapter is refused on receipt, not at
aggregation.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import sqlite3
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import msgpack
import numpy as np

from coordinator.aggregation import AdapterShape, AggregationError, FitResult, validate_fit_result
from coordinator.hot_rows import TransactionalNotes
from coordinator.round_arrays import ArraysGone, RoundArrayFiles
from coordinator.state_db import StateDB
from shared.protocol import DecodeError, array_from_wire, array_to_wire

log = logging.getLogger(__name__)

# Reports of a round received in this actor's life are kept in memory too, until the round's
# aggregation reads them (once: the read takes them out), so a round's inputs are not read back
# file by file. A device's own fine-tune outside any round is never aggregated: it is not held
# (it stayed in memory until evicted by newer reports). The round's file stays the durable copy:
# after a restart, or past this many bytes, result() reads it there.
MEMORY_CAP_BYTES = 256 * 2**20

# Every column but the arrays: a report's metadata is read often, its arrays once.
_META = (
    "job_id, device_id, round_id, cohort, base_model_hash, samples, layer_dims, n_classes, "
    "parent_adapter_version, received_at, file, accuracy_before, loss_before"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fit_reports (
    job_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    round_id TEXT,
    cohort TEXT NOT NULL,
    base_model_hash TEXT NOT NULL,
    samples INTEGER NOT NULL,
    layer_dims TEXT NOT NULL,
    n_classes INTEGER NOT NULL,
    parent_adapter_version INTEGER,
    received_at REAL NOT NULL,
    file TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS fit_reports_by_round ON fit_reports (round_id);
CREATE INDEX IF NOT EXISTS fit_reports_by_cohort ON fit_reports (cohort, received_at);
CREATE INDEX IF NOT EXISTS fit_reports_by_device ON fit_reports (device_id, received_at);
"""
# A device's reports (the API's device views) are read by the device index: a scan of every
# report held took 24 ms at 300,000 (docs/benchmarks.md). Through the jobs' device index it
# lost the reports kept past their job (coordinator.history keeps each cohort's newest).
# The rows whose arrays an earlier version stored, in the row or a file of its own, not yet
# released: release and rounds_holding_arrays read these alone (a report stored now is in no
# such row: its arrays are in its round's file). The same condition in a query
# lets SQLite use this partial index.
HOLDING_ARRAYS = "(arrays IS NOT NULL OR file != '')"
_HOLDING_INDEX = (
    "CREATE INDEX IF NOT EXISTS fit_reports_holding ON fit_reports (round_id) "
    f"WHERE {HOLDING_ARRAYS}"
)


class ReportRejected(ValueError):
    """A report that will not be aggregated; the message says why (and names the device)."""


class ReportUnreadable(Exception):
    """A stored report whose arrays are gone or damaged; the message names the report."""


@dataclass(frozen=True)
class CheckedValues:
    """A report checked in the MQTT bridge (its inbound worker, before the batch goes to the
    fleet actor) against the shape its own arrays imply: `error` says why it was refused, None
    that it passed. check_adapter then only compares that shape with the cohort's: the checks
    are the same function over the same shape, so their answer is too."""

    error: str | None = None


def check_values(
    device_id: str, arrays: Mapping[str, np.ndarray], samples: int
) -> CheckedValues | None:
    """check_adapter's checks of the report alone (no cohort): its verdict, never an exception
    (None if the checks broke: the actor then checks the report itself, and says why)."""
    try:
        check_adapter(device_id, arrays, samples, expected=None)
    except ReportRejected as err:
        return CheckedValues(str(err))
    except Exception:  # a bug must not end the bridge's inbound thread (nothing would be acked)
        log.exception("report from %s could not be checked in the bridge", device_id)
        return None
    return CheckedValues()


@dataclass(frozen=True)
class ReportMeta:
    job_id: str
    device_id: str
    round_id: str | None
    cohort: str
    base_model_hash: str
    samples: int
    shape: AdapterShape
    parent_adapter_version: int | None
    received_at: float
    # Relative to the state dir: where a report the earliest versions stored keeps its arrays
    # ("": elsewhere: in its round's file, as every report stored now, or in its row).
    file: str = ""
    # The device's hold-out measurement of the adapter its training started from: in a
    # federated run, the previous aggregate's accuracy and cross-entropy on that device.
    accuracy_before: float | None = None
    loss_before: float | None = None


def infer_shape(device_id: str, arrays: Mapping[str, np.ndarray]) -> AdapterShape:
    """The shape an adapter's own arrays imply (delta_k: d_k × C; A_k: d_k × R; B_k: R × C)."""
    layers = 0
    while f"delta{layers + 1}" in arrays or f"A{layers + 1}" in arrays:
        layers += 1
    if layers == 0:
        raise ReportRejected(f"device {device_id}: the adapter has neither delta1 nor A1")
    try:
        if "delta1" in arrays:
            dims = [np.shape(arrays[f"delta{k}"])[0] for k in range(1, layers + 1)]
            n_classes = np.shape(arrays["delta1"])[-1]
        else:
            dims = [np.shape(arrays[f"A{k}"])[0] for k in range(1, layers + 1)]
            n_classes = np.shape(arrays["B1"])[-1]
        return AdapterShape(tuple(int(d) for d in dims), int(n_classes))
    except (KeyError, IndexError, ValueError) as err:
        why = f"device {device_id}: adapter arrays are inconsistent ({err})"
        raise ReportRejected(why) from None


def check_adapter(
    device_id: str,
    arrays: Mapping[str, np.ndarray],
    samples: int,
    expected: AdapterShape | None,
    checked: CheckedValues | None = None,
) -> AdapterShape:
    """validate_fit_result against the cohort's shape (or the one the arrays imply, if first);
    `checked`: the answer check_values gave for these arrays and samples already."""
    shape = infer_shape(device_id, arrays)
    if expected is not None and shape != expected:
        raise ReportRejected(
            f"device {device_id}: adapter of shape {shape.layer_dims}×{shape.n_classes}, "
            f"the cohort's is {expected.layer_dims}×{expected.n_classes}"
        )
    if checked is not None:
        if checked.error is not None:
            raise ReportRejected(checked.error)
        return shape
    try:
        validate_fit_result(FitResult(device_id, dict(arrays), samples), shape)
    except AggregationError as err:
        raise ReportRejected(str(err)) from None
    return shape


class ReportStore:
    def __init__(self, db: StateDB, state_dir: str | Path) -> None:
        self._db = db
        self._state_dir = Path(state_dir)
        db.ensure_schema(_SCHEMA)
        db.add_missing_columns(
            "fit_reports",
            {
                "accuracy_before": "REAL",
                "loss_before": "REAL",
                "arrays": "BLOB",  # an earlier version's: the arrays in the row
                "arrays_file": "TEXT",  # its round's file, where (round_arrays)
                "arrays_at": "INTEGER",
                "arrays_len": "INTEGER",
            },
        )
        db.ensure_schema(_HOLDING_INDEX)
        self._held: OrderedDict[str, _Held] = OrderedDict()  # job -> its round and arrays
        self._held_bytes = 0
        self._shapes: dict[str, AdapterShape] = {}  # cohort -> the shape of its reports
        self._shapes_found = TransactionalNotes[str](
            db, commit=lambda cohorts: None, undo=self._forget_shapes
        )
        self._files = RoundArrayFiles(state_dir)
        # Files of released rounds (and of an earlier version's reports): removed once the
        # release commits, never while a row that rolls back could still need them.
        self._released_files = TransactionalNotes[str](db, commit=self._remove_files)
        self._released_rounds = TransactionalNotes[str](db, commit=self._remove_rounds)

    def save(
        self, meta: ReportMeta, arrays: Mapping[str, np.ndarray], *, checked_on_receipt: bool
    ) -> None:
        """Stores a report; a repeated one (same job) changes nothing. Its arrays are stored
        only for a round (nothing else reads them). A round's report whose arrays
        `checked_on_receipt` (check_adapter, values included) is also held in memory for the
        round's aggregation, which then does not read its values again (result)."""
        name = at = length = None
        if meta.round_id is not None:  # a repeat's bytes are written too, named by no row
            blob = arrays_blob(arrays)
            (name, at), length = self._files.append(meta.round_id, blob), len(blob)
        stored = self._db.execute(
            "INSERT OR IGNORE INTO fit_reports (job_id, device_id, round_id, cohort, "
            "base_model_hash, samples, layer_dims, n_classes, parent_adapter_version, "
            "received_at, file, accuracy_before, loss_before, arrays_file, arrays_at, arrays_len) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                meta.job_id,
                meta.device_id,
                meta.round_id,
                meta.cohort,
                meta.base_model_hash,
                meta.samples,
                _dims_text(meta.shape.layer_dims),
                meta.shape.n_classes,
                meta.parent_adapter_version,
                meta.received_at,
                "",
                meta.accuracy_before,
                meta.loss_before,
                name,
                at,
                length,
            ),
        )  # one statement, not a look-up first: a repeat is rare, and ignored here
        if stored and meta.round_id is not None and checked_on_receipt:
            self._hold(meta.job_id, meta.round_id, arrays)

    def get(self, job_id: str) -> ReportMeta | None:
        row = self._db.query_one(f"SELECT {_META} FROM fit_reports WHERE job_id = ?", (job_id,))
        return None if row is None else _from_row(row)

    def for_round(self, round_id: str) -> list[ReportMeta]:
        rows = self._db.query(
            f"SELECT {_META} FROM fit_reports WHERE round_id = ? ORDER BY received_at", (round_id,)
        )
        return [_from_row(r) for r in rows]

    def devices_reported(self, round_id: str) -> set[str]:
        rows = self._db.query("SELECT device_id FROM fit_reports WHERE round_id = ?", (round_id,))
        return {r["device_id"] for r in rows}

    def for_device(self, device_id: str, limit: int = 20) -> list[ReportMeta]:
        """The device's fine-tune reports (its personalised adapters, which it keeps), newest
        first; their arrays are kept only until their round ends."""
        rows = self._db.query(  # from the (device_id, received_at) index, not every report
            f"SELECT {_META} FROM fit_reports WHERE device_id = ? ORDER BY received_at DESC "
            "LIMIT ?",
            (device_id, limit),
        )
        return [_from_row(r) for r in rows]

    def cohort_shape(self, cohort: str) -> AdapterShape | None:
        """The shape of the cohort's first accepted report. Once a cohort has one it never
        changes, so it is read once (a query a report cost ~0.05 ms); a shape found inside a
        transaction that rolls back is forgotten with it (its report may be gone)."""
        shape = self._shapes.get(cohort)
        if shape is None:
            row = self._db.query_one(
                f"SELECT {_META} FROM fit_reports WHERE cohort = ? ORDER BY received_at, rowid "
                "LIMIT 1",
                (cohort,),
            )
            if row is None:
                return None
            shape = self._shapes[cohort] = _from_row(row).shape
            self._shapes_found.note(cohort)
        return shape

    def _forget_shapes(self, cohorts: list[str]) -> None:
        for cohort in cohorts:
            self._shapes.pop(cohort, None)

    def result(self, meta: ReportMeta) -> FitResult:
        """The report as an aggregation input. Its arrays held since it was checked on receipt
        are marked so; arrays read back from disk are not (damaged ones are checked again).
        ReportUnreadable if they are gone or damaged (that report fails, not its round)."""
        held = self._unhold(meta.job_id)
        if held is not None:
            return FitResult(meta.device_id, held, meta.samples, checked_on_receipt=True)
        return FitResult(meta.device_id, self._read_back(meta), meta.samples)

    def release(self, round_id: str | None) -> int:
        """Drops the arrays of the round's reports (None: of reports outside any round) from
        memory, from an earlier version's rows, and its file (and an earlier version's files)
        once this commits: the round has ended, and nothing reads them again. Returns how many
        reports held any in memory or in their rows."""
        with self._db.transaction():  # its own, if the caller has none: files go after it
            in_memory = [job for job, held in self._held.items() if held.round_id == round_id]
            for job in in_memory:
                self._unhold(job)
            rows = self._db.query(
                f"SELECT job_id, file FROM fit_reports WHERE round_id IS ? AND {HOLDING_ARRAYS}",
                (round_id,),
            )
            for row in rows:  # held ones are the round's too: let go above
                if row["file"]:
                    self._released_files.note(row["file"])
            self._db.execute(
                f"UPDATE fit_reports SET arrays = NULL, file = '' WHERE round_id IS ? "
                f"AND {HOLDING_ARRAYS}",
                (round_id,),
            )
            if round_id is not None:
                self._released_rounds.note(round_id)
        return len(set(in_memory) | {r["job_id"] for r in rows})

    def rounds_holding_arrays(self) -> set[str | None]:
        """The rounds (None: no round) with reports whose arrays are still stored: in a round's
        file, or in an earlier version's rows or files."""
        rows = self._db.query(f"SELECT DISTINCT round_id FROM fit_reports WHERE {HOLDING_ARRAYS}")
        return {r["round_id"] for r in rows} | set(self._files.rounds())

    def sync_files(self) -> None:
        """Makes the arrays written since the last call durable (each scan's, and a stop's:
        coordinator.round_arrays says why not at each commit)."""
        try:
            self._files.sync()
        except OSError as err:  # the next scan tries them again
            log.warning("could not sync the rounds' arrays files: %s", err)

    def close_files(self) -> None:
        """Syncs the rounds' arrays files (sync_files) and closes those kept open."""
        self.sync_files()
        self._files.close()

    def _remove_rounds(self, round_ids: list[str]) -> None:
        try:
            self._files.remove(round_ids)
        except OSError as err:  # only disk space is lost: the next scan tries again
            log.warning("could not remove the arrays files of rounds %s: %s", round_ids, err)

    def _remove_files(self, files: list[str]) -> None:
        folder = (self._state_dir / _LEGACY_DIR).resolve()
        for name in files:
            path = (self._state_dir / name).resolve()
            if path.parent != folder:  # an earlier version wrote reports/<job>.npz, nothing else
                log.warning("not removing %s: not a report file of the state dir", name)
                continue
            try:
                path.unlink(missing_ok=True)
            except OSError as err:  # the rows no longer name it: only disk space is lost
                log.warning("could not remove the released report file %s: %s", name, err)

    def _read_back(self, meta: ReportMeta) -> dict[str, np.ndarray]:
        if meta.file:  # stored by an earlier version: its own file
            return _load_npz(self._state_dir / meta.file, meta.job_id)
        row = self._db.query_one(
            "SELECT arrays, arrays_file, arrays_at, arrays_len FROM fit_reports WHERE job_id = ?",
            (meta.job_id,),
        )
        if row is not None and row["arrays"] is not None:  # an earlier version's row
            return arrays_from_blob(row["arrays"], meta.job_id)
        if row is None or row["arrays_file"] is None or meta.round_id is None:
            raise ReportUnreadable(f"report {meta.job_id} has no stored arrays")
        try:
            blob = self._files.read(
                meta.round_id, row["arrays_file"], row["arrays_at"], row["arrays_len"]
            )
        except (ArraysGone, OSError) as err:
            raise ReportUnreadable(
                f"report {meta.job_id}: its arrays cannot be read ({err})"
            ) from None
        return arrays_from_blob(blob, meta.job_id)

    def _hold(self, job_id: str, round_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        copy = {k: np.array(v) for k, v in arrays.items()}  # as np.load would: owned, writable
        self._unhold(job_id)
        self._held[job_id] = _Held(round_id, copy)
        self._held_bytes += _nbytes(copy)
        while self._held_bytes > MEMORY_CAP_BYTES:  # the oldest go back to being read from disk
            self._held_bytes -= _nbytes(self._held.popitem(last=False)[1].arrays)

    def _unhold(self, job_id: str) -> dict[str, np.ndarray] | None:
        """Takes the report's arrays out of memory (None if they were not held)."""
        held = self._held.pop(job_id, None)
        if held is None:
            return None
        self._held_bytes -= _nbytes(held.arrays)
        return held.arrays


class _Held(NamedTuple):
    round_id: str
    arrays: dict[str, np.ndarray]


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


def arrays_blob(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A report's arrays as stored (in its round's file; the last version: in its row): a
    msgpack map of wire-form arrays."""
    blob: bytes = msgpack.packb({name: array_to_wire(a) for name, a in arrays.items()})
    return blob


def arrays_from_blob(blob: bytes, job_id: str) -> dict[str, np.ndarray]:
    """The arrays arrays_blob stored (owned, writable, as np.load gives them), or a .npz blob
    an earlier version stored."""
    if blob.startswith(_ZIP_MAGIC):
        return _load_npz(io.BytesIO(blob), job_id)
    try:
        stored = msgpack.unpackb(blob)
        if not isinstance(stored, dict):
            raise DecodeError("not a map of arrays")
        return {str(name): array_from_wire(wire).copy() for name, wire in stored.items()}
    except (DecodeError, ValueError, msgpack.UnpackException) as err:
        raise ReportUnreadable(f"report {job_id}: its stored arrays are damaged ({err})") from None


_ZIP_MAGIC = b"PK\x03\x04"  # a .npz (a zip archive)
_LEGACY_DIR = "reports"  # where the earliest versions wrote a file a report


def _load_npz(source: Path | io.BytesIO, job_id: str) -> dict[str, np.ndarray]:
    try:
        with np.load(source, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # gone, or not a .npz any more
        why = f"report {job_id}: its stored arrays cannot be read ({err})"
        raise ReportUnreadable(why) from None


@functools.lru_cache(maxsize=64)
def _dims_text(layer_dims: tuple[int, ...]) -> str:
    """A shape's layer_dims as its rows store them, made once per shape (a round's reports all
    have their cohort's: ~1 % of the fleet actor's CPU in a 10,000-device round, made each)."""
    return json.dumps(list(layer_dims))


@functools.lru_cache(maxsize=64)
def _shape(layer_dims: str, n_classes: int) -> AdapterShape:
    """A stored shape (a cohort's, the same in every row of its reports), parsed once: a round's
    10,000 reports read back parsed their JSON 10,000 times."""
    return AdapterShape(tuple(json.loads(layer_dims)), n_classes)


def _from_row(row: sqlite3.Row) -> ReportMeta:
    return ReportMeta(
        job_id=row["job_id"],
        device_id=row["device_id"],
        round_id=row["round_id"],
        cohort=row["cohort"],
        base_model_hash=row["base_model_hash"],
        samples=row["samples"],
        shape=_shape(row["layer_dims"], row["n_classes"]),
        parent_adapter_version=row["parent_adapter_version"],
        received_at=row["received_at"],
        file=row["file"],
        accuracy_before=row["accuracy_before"],
        loss_before=row["loss_before"],
    )
