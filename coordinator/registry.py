"""Fleet registry: what the coordinator knows about each device, checkpointed to SQLite.

The records are held in memory (coordinator.hot_rows: loaded once, read without a query) and
every change is written to SQLite in the caller's transaction, when it commits, so a restarted
coordinator (or Ray actor) constructs a FleetRegistry and sees exactly what was last committed.
Times are the coordinator's clock at receipt, so a stale (out-of-order, QoS 1 re-delivered)
heartbeat or presence message is recognised and ignored rather than overwriting newer state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from coordinator.clock import Clock, system_clock
from coordinator.hot_rows import HotRows
from coordinator.state_db import StateDB

DEVICE_ID = re.compile(r"[a-z0-9-]{1,64}")
TASK = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class UnknownDeviceError(KeyError):
    pass


@dataclass(frozen=True)
class LabelFree:
    """A heartbeat's label-free readings: calibrated scores, signature, adapter origin."""

    confidence_score: float | None = None
    feature_score: float | None = None
    label_free_reference: float | None = None  # its score when the last run began
    label_free_since: float | None = None  # over the trigger threshold since (continuously)
    signature: bytes | None = None  # float32, little-endian
    signature_rows: int | None = None
    adapter_origin: str | None = None

    def readings(self) -> dict[str, float | None]:
        return {"confidence_score": self.confidence_score, "feature_score": self.feature_score}

    def columns(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    online: bool = False
    presence_since: float | None = None
    last_heartbeat_at: float | None = None
    power_w: float | None = None
    # The device's cumulative energy counter as last reported, and what it used in the registry's
    # current energy period (kept per period so a budget can be enforced per hour/day).
    energy_j: float | None = None
    energy_period_start: float | None = None
    energy_used_in_period_j: float = 0.0
    # Messages its spool holds (waiting for the broker's acknowledgement), from the heartbeat.
    spool_depth: int | None = None
    temperature_c: float | None = None
    drift_score: float | None = None
    # Latest accuracy of the adapter the device runs, on its recent data.
    accuracy: float | None = None
    accuracy_at: float | None = None
    # The last fine-tune: accuracy before and after it, when, and the reference for drop triggers.
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    last_finetune_at: float | None = None
    accuracy_at_last_finetune: float | None = None
    # What the device's drift score is measured against: its first score, then its score at each
    # fine-tune. Devices differ (a quiet 8 cm fan sits higher than a quiet 12 cm one), and an
    # adapter does not move the inputs back, so drift counts from the device's own reference.
    drift_reference: float | None = None
    adapter_version: int | None = None
    base_model_hash: str | None = None
    task: str | None = None
    cohort: str | None = None
    last_skip_reason: str | None = None
    last_skip_at: float | None = None
    # Labelled rows the device trains on and holds out (presence); 0 and 0: no labels.
    train_samples: int | None = None
    holdout_samples: int | None = None
    # Calibrated label-free drift scores (1.0 = the base model's threshold) and the feature
    # signature clusters are made of (float32 bytes), from the heartbeat.
    confidence_score: float | None = None
    feature_score: float | None = None
    label_free_reference: float | None = None  # its score when the last run began
    label_free_since: float | None = None  # over the trigger threshold since (continuously)
    signature: bytes | None = None
    signature_rows: int | None = None
    # What the device runs (base, personal, fleet) and why it runs it.
    adapter_origin: str | None = None
    adapter_reason: str | None = None
    # The fleet version last offered to the device, and what it said (installed or declined).
    offered_version: int | None = None
    offer_result: str | None = None
    # Jobs it let time out in a row; past a limit it is quarantined until the given time.
    timeouts_in_a_row: int | None = None
    quarantined_until: float | None = None
    # Its clock minus ours (s), as it estimated from our messages' sent times (heartbeat).
    clock_offset_s: float | None = None

    @property
    def labelled(self) -> bool:
        """Can fine-tune and measure (an agent too old to say is taken to have labels)."""
        if self.train_samples is None or self.holdout_samples is None:
            return True
        return self.train_samples > 0 and self.holdout_samples > 0

    def signature_vector(self) -> np.ndarray | None:
        """The signature as a float32 vector, or None."""
        if self.signature is None:
            return None
        return np.frombuffer(self.signature, dtype="<f4")


_COLUMNS = [f.name for f in dataclasses.fields(DeviceRecord)]
# Reads name the columns in DeviceRecord's order, so a row becomes a record by position
# (sqlite3.Row's look-up by name cost most of a whole-fleet scan).
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM devices"
_ONLINE = _COLUMNS.index("online")


def _sql_type(annotation: object) -> str:
    # Annotations are strings here (from __future__ import annotations): "float | None" etc.
    assert isinstance(annotation, str), annotation
    base = annotation.split("|")[0].strip()
    sql = {"bool": "INTEGER", "int": "INTEGER", "float": "REAL", "str": "TEXT", "bytes": "BLOB"}[
        base
    ]
    return sql if "None" in annotation else f"{sql} NOT NULL"


_SCHEMA = "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, {});".format(
    ", ".join(f"{f.name} {_sql_type(f.type)}" for f in dataclasses.fields(DeviceRecord)[1:])
)
_NULLABLE_COLUMNS = {
    f.name: _sql_type(f.type)
    for f in dataclasses.fields(DeviceRecord)[1:]
    if "None" in str(f.type)  # a string annotation, as _sql_type checks
}
_UPSERT = "INSERT INTO devices ({}) VALUES ({}) ON CONFLICT(device_id) DO UPDATE SET {}".format(
    ", ".join(_COLUMNS),
    ", ".join("?" for _ in _COLUMNS),
    ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS[1:]),
)


def cohort_id(base_model_hash: str, task: str) -> str:
    """Devices that share a base model and a task can share adapters: that is a cohort."""
    return f"{task}-{base_model_hash[:12].lower()}"


class FleetRegistry:
    def __init__(
        self, db: StateDB, *, clock: Clock = system_clock, energy_period_s: float = 3600.0
    ) -> None:
        if energy_period_s <= 0:
            raise ValueError(f"energy_period_s must be > 0, got {energy_period_s}")
        self._db = db
        self._clock = clock
        self.energy_period_s = float(energy_period_s)
        db.ensure_schema(_SCHEMA)
        db.add_missing_columns("devices", _NULLABLE_COLUMNS)
        loaded = {record.device_id: record for record in map(_from_row, db.query(_SELECT))}
        self._records: HotRows[DeviceRecord] = HotRows(
            db,
            loaded,
            upsert=(_UPSERT, _row_of),
            delete="DELETE FROM devices WHERE device_id = ?",
            tally=lambda record: (record.cohort, record.online),
        )

    # ---- reads

    def get(self, device_id: str) -> DeviceRecord | None:
        return self._records.get(device_id)

    def require(self, device_id: str) -> DeviceRecord:
        record = self.get(device_id)
        if record is None:
            raise UnknownDeviceError(device_id)
        return record

    def devices(self, cohort: str | None = None) -> list[DeviceRecord]:
        """Every device (of one cohort), by id."""
        records: Iterator[DeviceRecord] = self._records.values()
        if cohort is not None:
            records = (r for r in records if r.cohort == cohort)
        return sorted(records, key=_by_id)

    def counts(self) -> tuple[int, int]:
        """(devices, online devices) as committed, counted as commits land: /health asks this,
        and is polled (a walk of 10,000 records took ~13 ms of the actor in a round)."""
        tallies = self._tallies()
        return sum(tallies.values()), sum(n for (_, online), n in tallies.items() if online)

    def committed_cohorts(self) -> set[str]:
        """The cohorts committed records are in, from the same tallies: no walk of the fleet."""
        return {cohort for cohort, _ in self._tallies() if cohort is not None}

    def _tallies(self) -> dict[tuple[str | None, bool], int]:
        tallies = self._records.committed_tallies()  # keyed as the tally above makes them
        return cast(dict[tuple[str | None, bool], int], tallies)

    def changed_since(self, version: int) -> tuple[list[DeviceRecord], int]:
        """The committed records changed after `version` (0: all), and the version now."""
        return self._records.committed_since(version)

    def cohorts(self) -> dict[str, list[str]]:
        """Each cohort's device ids, by id."""
        return {cohort: [r.device_id for r in rs] for cohort, rs in self.by_cohort().items()}

    def by_cohort(self) -> dict[str, list[DeviceRecord]]:
        """Each cohort's records, by id, from one pass over the fleet (the scan sorted the fleet
        once for its cohorts, then again for each cohort's records)."""
        members: dict[str, list[DeviceRecord]] = {}
        for record in self.devices():
            if record.cohort is not None:
                members.setdefault(record.cohort, []).append(record)
        return members

    def energy_used_this_period(self, record: DeviceRecord) -> float:
        """Joules the device used in the current energy period (0 if it reported none in it)."""
        if record.energy_period_start != self._period_start(self._clock()):
            return 0.0
        return record.energy_used_in_period_j

    # ---- updates

    def register(
        self,
        device_id: str,
        *,
        base_model_hash: str,
        task: str,
        train_samples: int | None = None,
        holdout_samples: int | None = None,
    ) -> DeviceRecord:
        if not TASK.fullmatch(task):
            raise ValueError(f"task {task!r} must match {TASK.pattern}")
        if not base_model_hash:
            raise ValueError(f"device {device_id}: empty base-model hash")
        cohort = cohort_id(base_model_hash, task)
        return self._update(
            device_id,
            base_model_hash=base_model_hash,
            task=task,
            cohort=cohort,
            train_samples=train_samples,
            holdout_samples=holdout_samples,
        )

    def set_presence(
        self, device_id: str, online: bool, *, at: float | None = None
    ) -> DeviceRecord:
        at = self._at(at)
        with self._atomic():
            record = self._load_or_new(device_id)
            if record.presence_since is not None and at < record.presence_since:
                return record  # older than what we know: a re-delivered or reordered message
            if record.online == online and record.presence_since is not None:
                return record  # unchanged: keep the time it became so
            return self._save(_changed(record, online=online, presence_since=at))

    def record_heartbeat(
        self,
        device_id: str,
        *,
        at: float | None = None,
        power_w: float | None = None,
        energy_j: float | None = None,
        spool_depth: int | None = None,
        temperature_c: float | None = None,
        drift_score: float | None = None,
        adapter_version: int | None = None,
        label_free: LabelFree | None = None,
        clock_offset_s: float | None = None,
    ) -> DeviceRecord:
        at = self._at(at)
        readings = {"power_w": power_w, "temperature_c": temperature_c, "drift_score": drift_score,
                    "clock_offset_s": clock_offset_s}  # fmt: skip
        if label_free is not None:
            readings.update(label_free.readings())
        _check_finite(device_id, {**readings, "energy_j": energy_j})
        with self._atomic():
            record = self._load_or_new(device_id)
            if record.last_heartbeat_at is not None and at < record.last_heartbeat_at:
                return record
            changes: dict[str, Any] = {k: v for k, v in readings.items() if v is not None}
            changes["last_heartbeat_at"] = at
            if drift_score is not None and record.drift_reference is None:
                changes["drift_reference"] = drift_score  # its own baseline: devices differ
            if adapter_version is not None:
                changes["adapter_version"] = adapter_version
            if label_free is not None:
                changes.update(label_free.columns())
                if label_free.adapter_origin is not None:  # a personal adapter has no version
                    changes["adapter_version"] = adapter_version
            if energy_j is not None:
                changes.update(self._energy_changes(record, energy_j, at))
            if spool_depth is not None:
                changes["spool_depth"] = spool_depth
            # A heartbeat proves the device is connected, unless presence news is newer.
            if not record.online and (record.presence_since is None or at >= record.presence_since):
                changes.update(online=True, presence_since=at)
            return self._save(_changed(record, **changes))

    def record_accuracy(
        self, device_id: str, accuracy: float, *, at: float | None = None
    ) -> DeviceRecord:
        _check_accuracy(device_id, accuracy)
        return self._update(device_id, accuracy=accuracy, accuracy_at=self._at(at))

    def record_finetune(
        self,
        device_id: str,
        *,
        accuracy_before: float,
        accuracy_after: float,
        at: float | None = None,
        adapter_version: int | None = None,
    ) -> DeviceRecord:
        """A fine-tune finished: its accuracy after becomes the reference for drop triggers."""
        _check_accuracy(device_id, accuracy_before)
        _check_accuracy(device_id, accuracy_after)
        at = self._at(at)
        record = self.get(device_id)
        changes: dict[str, Any] = {
            "drift_reference": record.drift_score if record is not None else None,
            "accuracy_before": accuracy_before,
            "accuracy_after": accuracy_after,
            "last_finetune_at": at,
            "accuracy_at_last_finetune": accuracy_after,
            "accuracy": accuracy_after,
            "accuracy_at": at,
        }
        if adapter_version is not None:
            changes["adapter_version"] = adapter_version
        return self._update(device_id, **changes)

    def set_adapter_version(self, device_id: str, version: int | None) -> DeviceRecord:
        return self._update(device_id, adapter_version=version)

    def set_running(
        self, device_id: str, *, version: int | None, origin: str, reason: str
    ) -> DeviceRecord:
        """What the device runs now (a fleet version, its personal adapter, the base model)
        and why, as the device reported it."""
        return self._update(
            device_id, adapter_version=version, adapter_origin=origin, adapter_reason=reason
        )

    def record_timeout(self, device_id: str, *, at: float, limit: int, hold_s: float) -> bool:
        """A job of the device timed out; True if that quarantines it (limit in a row)."""
        with self._atomic():
            record = self.get(device_id)
            if record is None:
                return False
            count = (record.timeouts_in_a_row or 0) + 1
            quarantine = count >= limit
            until = at + hold_s if quarantine else record.quarantined_until
            self._save(_changed(record, timeouts_in_a_row=count, quarantined_until=until))
            return quarantine

    def record_answer(self, device_id: str) -> None:
        """The device answered a job: its run of timeouts (and any quarantine) ends."""
        record = self.get(device_id)
        if record is not None and (record.timeouts_in_a_row or record.quarantined_until):
            self._update(device_id, timeouts_in_a_row=0, quarantined_until=None)

    def note_label_free(self, device_id: str, above: bool, at: float) -> None:
        """Whether its label-free score is over the trigger threshold now; keeps since when."""
        record = self.get(device_id)
        if record is None:
            return
        if above and record.label_free_since is None:
            self._update(device_id, label_free_since=at)
        elif not above and record.label_free_since is not None:
            self._update(device_id, label_free_since=None)

    def set_label_free_reference(self, device_id: str, score: float | None) -> DeviceRecord:
        return self._update(device_id, label_free_reference=score)

    def set_offer(self, device_id: str, version: int | None, result: str | None) -> DeviceRecord:
        """The fleet version last offered to the device and its answer (None: not yet)."""
        return self._update(device_id, offered_version=version, offer_result=result)

    def record_skip(self, device_id: str, reason: str, *, at: float | None = None) -> None:
        """Why the scheduler did not fine-tune this device (kept so an operator can ask)."""
        if self.get(device_id) is not None:
            self._update(device_id, last_skip_reason=reason, last_skip_at=self._at(at))

    def remove(self, device_id: str) -> bool:
        with self._atomic():
            known = self.get(device_id) is not None
            self._records.put(device_id, None)
            return known

    # ---- internals

    def _atomic(self) -> AbstractContextManager[object]:
        """The caller's transaction, or one of its own: a change only replaces a record in
        memory, all at once, so it needs no savepoint of its own (which costs two statements)."""
        return nullcontext() if self._db.in_transaction else self._db.transaction()

    def _update(self, device_id: str, **changes: Any) -> DeviceRecord:
        with self._atomic():
            record = self._load_or_new(device_id)
            return self._save(_changed(record, **changes))

    def _load_or_new(self, device_id: str) -> DeviceRecord:
        if not DEVICE_ID.fullmatch(device_id):
            raise ValueError(f"device id {device_id!r} must match {DEVICE_ID.pattern}")
        return self.get(device_id) or DeviceRecord(device_id)

    def _save(self, record: DeviceRecord) -> DeviceRecord:
        if self._records.get(record.device_id) is not record:  # (unchanged: nothing to write)
            self._records.put(record.device_id, record)  # written when the transaction commits
        return record

    def _energy_changes(self, record: DeviceRecord, energy_j: float, at: float) -> dict[str, Any]:
        if record.energy_j is None:
            used = 0.0  # the first reading is a baseline: we don't know when that energy was used
        elif energy_j >= record.energy_j:
            used = energy_j - record.energy_j
        else:
            used = energy_j  # the counter went back: the device restarted it from zero
        period = self._period_start(at)
        if record.energy_period_start == period:
            used += record.energy_used_in_period_j
        return {
            "energy_j": energy_j,
            "energy_period_start": period,
            "energy_used_in_period_j": used,
        }

    def _period_start(self, at: float) -> float:
        return math.floor(at / self.energy_period_s) * self.energy_period_s

    def _at(self, at: float | None) -> float:
        return self._clock() if at is None else float(at)


_FIELDS = frozenset(_COLUMNS)


def _changed(record: DeviceRecord, **changes: Any) -> DeviceRecord:
    """dataclasses.replace for a record (no validation to re-run: DeviceRecord has none), at a
    fraction of its cost (it re-ran __init__ over all 45 fields); the record itself if nothing
    changes, so an unchanged device is not written again."""
    unknown = changes.keys() - _FIELDS
    if unknown:
        raise TypeError(f"DeviceRecord has no fields {sorted(unknown)}")
    values = record.__dict__
    if all(values[name] == value for name, value in changes.items()):
        return record
    new = object.__new__(DeviceRecord)
    new.__dict__.update(values)
    new.__dict__.update(changes)
    return new


def _row_of(record: DeviceRecord) -> tuple[Any, ...]:
    """The record's _UPSERT parameters."""
    values = [getattr(record, c) for c in _COLUMNS]
    values[_ONLINE] = int(record.online)
    return tuple(values)


def _by_id(record: DeviceRecord) -> str:
    return record.device_id


def _from_row(row: Sequence[Any]) -> DeviceRecord:
    """A row of _SELECT (columns in DeviceRecord's field order)."""
    values = list(row)
    values[_ONLINE] = bool(values[_ONLINE])
    return DeviceRecord(*values)


def _check_finite(device_id: str, values: Mapping[str, float | None]) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"device {device_id}: {name} is not finite ({value})")


def _check_accuracy(device_id: str, accuracy: float) -> None:
    if not (math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0):
        raise ValueError(f"device {device_id}: accuracy must be in [0, 1], got {accuracy}")
