"""Fine-tune reports: checked on receipt, kept on disk until their round is aggregated.

A round may close after the actor restarted, so reports cannot live in memory: each goes to its
row in SQLite, its arrays as one .npz blob in the same row, committed with the batch that
applied the report. (Earlier versions of the coordinator wrote the arrays to a file
`reports/<job_id>.npz` each, the row naming it; such rows are still read from their files. A
file per report cost 0.1-0.8 ms of file creation a report here, more than the rest of its
handling.)
A cohort's adapter shape (layer widths, class count) is taken from its first accepted report;
every later report must match it, so a wrong-sized adapter is refused on receipt, not at
aggregation.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordinator.aggregation import AdapterShape, AggregationError, FitResult, validate_fit_result
from coordinator.hot_rows import TransactionalNotes
from coordinator.npz import npz_bytes
from coordinator.state_db import StateDB

# Reports of a round received in this actor's life are kept in memory too, until the round's
# aggregation reads them (once: the read takes them out), so a round's inputs are not read back
# file by file. A device's own fine-tune outside any round is never aggregated: it is not held
# (it stayed in memory until evicted by newer reports). The rows stay the durable copy: after a
# restart, or past this many bytes, arrays() reads them.
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
"""


class ReportRejected(ValueError):
    """A report that will not be aggregated; the message says why (and names the device)."""


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
    # Relative to the state dir: where a report an earlier version stored keeps its arrays
    # ("": in its row, as every report stored now).
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
) -> AdapterShape:
    """validate_fit_result against the cohort's shape (or the one the arrays imply, if first)."""
    shape = infer_shape(device_id, arrays)
    if expected is not None and shape != expected:
        raise ReportRejected(
            f"device {device_id}: adapter of shape {shape.layer_dims}×{shape.n_classes}, "
            f"the cohort's is {expected.layer_dims}×{expected.n_classes}"
        )
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
            "fit_reports", {"accuracy_before": "REAL", "loss_before": "REAL", "arrays": "BLOB"}
        )
        self._held: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # job -> arrays
        self._held_bytes = 0
        self._shapes: dict[str, AdapterShape] = {}  # cohort -> the shape of its reports
        self._shapes_found = TransactionalNotes[str](
            db, commit=lambda cohorts: None, undo=self._forget_shapes
        )

    def save(self, meta: ReportMeta, arrays: Mapping[str, np.ndarray]) -> None:
        """Stores a checked report; a repeated one (same job) changes nothing."""
        if self._exists(meta.job_id):
            return
        self._db.execute(
            "INSERT OR IGNORE INTO fit_reports (job_id, device_id, round_id, cohort, "
            "base_model_hash, samples, layer_dims, n_classes, parent_adapter_version, "
            "received_at, file, accuracy_before, loss_before, arrays) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                meta.job_id,
                meta.device_id,
                meta.round_id,
                meta.cohort,
                meta.base_model_hash,
                meta.samples,
                json.dumps(list(meta.shape.layer_dims)),
                meta.shape.n_classes,
                meta.parent_adapter_version,
                meta.received_at,
                "",
                meta.accuracy_before,
                meta.loss_before,
                npz_bytes(arrays),  # np.savez's format at a fraction of its cost
            ),
        )
        if meta.round_id is not None:
            self._hold(meta.job_id, arrays)

    def _exists(self, job_id: str) -> bool:
        found = self._db.query_one("SELECT 1 FROM fit_reports WHERE job_id = ?", (job_id,))
        return found is not None

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
        """The device's own (personalised) adapters, newest first: kept beside the fleet's."""
        rows = self._db.query(
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

    def arrays(self, meta: ReportMeta) -> dict[str, np.ndarray]:
        held = self._held.pop(meta.job_id, None)
        if held is not None:
            self._held_bytes -= _nbytes(held)
            return held
        if meta.file:  # stored by an earlier version: its own file
            return _load_npz(self._state_dir / meta.file)
        row = self._db.query_one("SELECT arrays FROM fit_reports WHERE job_id = ?", (meta.job_id,))
        if row is None or row["arrays"] is None:
            raise FileNotFoundError(f"report {meta.job_id} has no stored arrays")
        return _load_npz(io.BytesIO(row["arrays"]))

    def _hold(self, job_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        copy = {k: np.array(v) for k, v in arrays.items()}  # as np.load would: owned, writable
        if job_id in self._held:
            self._held_bytes -= _nbytes(self._held.pop(job_id))
        self._held[job_id] = copy
        self._held_bytes += _nbytes(copy)
        while self._held_bytes > MEMORY_CAP_BYTES:  # the oldest go back to being read from rows
            self._held_bytes -= _nbytes(self._held.popitem(last=False)[1])


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())


def _load_npz(source: Path | io.BytesIO) -> dict[str, np.ndarray]:
    with np.load(source, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _from_row(row: sqlite3.Row) -> ReportMeta:
    return ReportMeta(
        job_id=row["job_id"],
        device_id=row["device_id"],
        round_id=row["round_id"],
        cohort=row["cohort"],
        base_model_hash=row["base_model_hash"],
        samples=row["samples"],
        shape=AdapterShape(tuple(json.loads(row["layer_dims"])), row["n_classes"]),
        parent_adapter_version=row["parent_adapter_version"],
        received_at=row["received_at"],
        file=row["file"],
        accuracy_before=row["accuracy_before"],
        loss_before=row["loss_before"],
    )
