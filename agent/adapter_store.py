"""The adapter the device runs, the one before it (for rollback), and the device's own latest
fine-tune (its personal adapter), kept in the state dir.

Layout under `root`:
    slots/<slot>/adapter.npz   the arrays (`Adapter.to_arrays()` names), loaded allow_pickle=False
    slots/<slot>/meta.json     version, base-model hash, source, when, details
    pointer.json               {"current": slot | null, "previous": slot | null,
                                "personal": slot | null}
A slot is written completely before `pointer.json` is atomically replaced to name it, so a
power cut leaves either the old state or the new one, never a half-written adapter. Slots the
pointer no longer names are deleted afterwards. Installing a fine-tune of this device makes it
both `current` and `personal`; the personal slot stays while fleet adapters come and go (one
slot may be named twice), so the device keeps its own adapter to compare and come back to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from shared.protocol.enums import AdapterOrigin

log = logging.getLogger(__name__)

SLOT_NAMES = ("current", "previous", "personal")


class AdapterSource(StrEnum):
    FINETUNE = "finetune"  # trained on this device
    COORDINATOR = "coordinator"  # a fleet version published by the coordinator

    @property
    def origin(self) -> AdapterOrigin:
        return AdapterOrigin.PERSONAL if self is AdapterSource.FINETUNE else AdapterOrigin.FLEET


class BaseModelMismatch(ValueError):
    """The adapter was made for another base model: its deltas would be meaningless here."""


class NothingToRollBack(LookupError):
    """No previous adapter is kept."""


@dataclass(frozen=True)
class AdapterMeta:
    version: int | None  # the coordinator's version; None for a local fine-tune not yet versioned
    base_model_hash: str
    source: AdapterSource
    created_at: float
    details: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "base_model_hash": self.base_model_hash,
            "source": self.source.value,
            "created_at": self.created_at,
            "details": dict(self.details),
        }

    @classmethod
    def from_json(cls, data: dict) -> AdapterMeta:
        return cls(
            version=data["version"],
            base_model_hash=data["base_model_hash"],
            source=AdapterSource(data["source"]),
            created_at=float(data["created_at"]),
            details=data.get("details", {}),
        )


@dataclass(frozen=True, eq=False)
class StoredAdapter:
    meta: AdapterMeta
    arrays: Mapping[str, np.ndarray]
    slot: str  # its directory under slots/: names this very adapter (e.g. what declined what)


class AdapterStore:
    def __init__(self, root: Path, base_model_hash: str, clock: Callable[[], float] = time.time):
        self._root = root
        self._slots = root / "slots"
        self._slots.mkdir(parents=True, exist_ok=True)
        self._base_model_hash = base_model_hash
        self._clock = clock
        self._lock = threading.Lock()
        self._pointer = self._read_pointer()
        self._current = self._load_slot(self._pointer["current"])
        if self._current is not None and self._current.meta.base_model_hash != base_model_hash:
            # A new base model was deployed: adapters of the old one mean nothing on it.
            log.warning(
                "stored adapters belong to base model %s; starting without adapter",
                self._current.meta.base_model_hash,
            )
            self._set_pointer(current=None, previous=None, personal=None)
            self._current = None

    @property
    def current(self) -> StoredAdapter | None:
        with self._lock:
            return self._current

    @property
    def previous(self) -> StoredAdapter | None:
        with self._lock:
            return self._load_slot(self._pointer["previous"])

    @property
    def personal(self) -> StoredAdapter | None:
        """The latest fine-tune of this device that was installed, whatever runs now."""
        with self._lock:
            return self._load_slot(self._pointer["personal"])

    @property
    def origin(self) -> AdapterOrigin:
        """Where the running adapter came from (BASE: none runs)."""
        current = self.current
        return AdapterOrigin.BASE if current is None else current.meta.source.origin

    def find(self, version: int) -> StoredAdapter | None:
        """The current or previous adapter if it has this coordinator version."""
        for stored in (self.current, self.previous):
            if stored is not None and stored.meta.version == version:
                return stored
        return None

    def install(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        version: int | None,
        base_model_hash: str,
        source: AdapterSource,
        details: Mapping | None = None,
    ) -> StoredAdapter:
        """Make these arrays the running adapter; the one running now becomes `previous`."""
        if base_model_hash != self._base_model_hash:
            raise BaseModelMismatch(
                f"adapter for base model {base_model_hash}, device runs {self._base_model_hash}"
            )
        meta = AdapterMeta(version, base_model_hash, source, self._clock(), dict(details or {}))
        slot = self._write_slot(arrays, meta)
        with self._lock:
            personal = slot if source is AdapterSource.FINETUNE else self._pointer["personal"]
            self._set_pointer(current=slot, previous=self._pointer["current"], personal=personal)
            self._current = self._load_slot(slot)
            return self._current

    def clear(self) -> StoredAdapter | None:
        """Run the base model alone; the adapter running until now (returned) becomes `previous`."""
        with self._lock:
            running = self._pointer["current"]
            if running is None:
                return None
            self._set_pointer(current=None, previous=running)
            stopped, self._current = self._current, None
            return stopped

    def rollback(self) -> StoredAdapter:
        """Swap current and previous: a second rollback undoes the first."""
        with self._lock:
            previous = self._pointer["previous"]
            if previous is None:
                raise NothingToRollBack("no previous adapter kept")
            self._set_pointer(current=previous, previous=self._pointer["current"])
            self._current = self._load_slot(previous)
            return self._current

    # -- files ------------------------------------------------------------------------------
    def _write_slot(self, arrays: Mapping[str, np.ndarray], meta: AdapterMeta) -> str:
        slot = uuid.uuid4().hex
        tmp = self._slots / f".{slot}.tmp"
        tmp.mkdir()
        with open(tmp / "adapter.npz", "wb") as f:
            np.savez(f, **{name: np.asarray(a, dtype=np.float32) for name, a in arrays.items()})
            f.flush()
            os.fsync(f.fileno())
        _write_json(tmp / "meta.json", meta.to_json())
        os.replace(tmp, self._slots / slot)
        return slot

    def _load_slot(self, slot: str | None) -> StoredAdapter | None:
        if slot is None:
            return None
        where = self._slots / slot
        meta = AdapterMeta.from_json(json.loads((where / "meta.json").read_text()))
        with np.load(where / "adapter.npz", allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        return StoredAdapter(meta, arrays, slot)

    def _read_pointer(self) -> dict:
        try:
            stored = json.loads((self._root / "pointer.json").read_text())
        except FileNotFoundError:
            stored = {}
        return {name: stored.get(name) for name in SLOT_NAMES}  # older stores: no personal

    def _set_pointer(self, **changes: str | None) -> None:
        pointer = {**self._pointer, **changes}
        _write_json(self._root / "pointer.json", pointer)
        self._pointer = pointer
        self._remove_unreferenced()

    def _remove_unreferenced(self) -> None:
        keep = {s for s in self._pointer.values() if s}
        for path in self._slots.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
