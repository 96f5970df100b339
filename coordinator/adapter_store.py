"""Versioned fleet adapters per cohort: arrays as .npz files, metadata and lineage in SQLite.

Versions are monotonic ints per cohort, whatever cluster of the cohort they were trained for, so
a version number names one adapter to a device that moves between clusters. Saving a version
does not deploy it: each cluster of a cohort has a "current" pointer that only the rollout moves
(promote) or leaves alone (rollback); WHOLE_COHORT is the cluster of a cohort not split up. A
cohort is bound to the base-model hash of its first adapter; an adapter is only meaningful on top
of the exact base weights it was trained on, so any other hash is refused on save and on read.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.clock import Clock, system_clock
from coordinator.state_db import StateDB

COHORT = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
ARRAY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    cohort TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_model_hash TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    device_ids TEXT NOT NULL,
    round_id TEXT,
    parent_version INTEGER,
    created_at REAL NOT NULL,
    file TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (cohort, version)
);
CREATE TABLE IF NOT EXISTS current_adapters (
    cohort TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_adapters (
    cohort TEXT NOT NULL,
    cluster TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (cohort, cluster)
);
"""
# The cluster of a cohort that is not split into clusters (and of state dirs from before).
WHOLE_COHORT = "all"


class AdapterStoreError(ValueError):
    pass


class BaseModelMismatchError(AdapterStoreError):
    pass


@dataclass(frozen=True)
class AdapterVersion:
    cohort: str
    version: int
    base_model_hash: str
    algorithm: str
    device_ids: tuple[str, ...]
    round_id: str | None
    parent_version: int | None
    created_at: float
    file: str  # relative to the state dir
    sha256: str
    cluster: str = WHOLE_COHORT  # the cluster it was trained for


@dataclass(frozen=True)
class StoredAdapter:
    meta: AdapterVersion
    arrays: dict[str, np.ndarray]


class AdapterStore:
    def __init__(self, db: StateDB, state_dir: str | Path, *, clock: Clock = system_clock) -> None:
        self._db = db
        self._state_dir = Path(state_dir)
        self._clock = clock
        db.ensure_schema(_SCHEMA)
        db.add_missing_columns("adapters", {"cluster": "TEXT"})
        # pointers of a state dir from before clusters: the whole cohort's
        db.execute(
            "INSERT OR IGNORE INTO cluster_adapters SELECT cohort, ?, version, updated_at "
            "FROM current_adapters",
            (WHOLE_COHORT,),
        )
        db.execute("DELETE FROM current_adapters")

    def save(
        self,
        cohort: str,
        arrays: Mapping[str, np.ndarray],
        *,
        base_model_hash: str,
        algorithm: str,
        device_ids: Iterable[str] = (),
        round_id: str | None = None,
        parent_version: int | None = None,
        cluster: str = WHOLE_COHORT,
    ) -> AdapterVersion:
        """Stores a new version (latest + 1); does not make it current."""
        _check_cohort(cohort)
        _check_arrays(arrays)
        with self._db.transaction():
            self._check_base_model(cohort, base_model_hash)
            if parent_version is not None:
                self._require_meta(cohort, parent_version)
            version = (self.latest_version(cohort) or 0) + 1
            relative = Path("adapters") / cohort / f"v{version:06d}.npz"
            digest = _write_npz(self._state_dir / relative, arrays)
            meta = AdapterVersion(
                cohort=cohort,
                version=version,
                base_model_hash=base_model_hash,
                algorithm=algorithm,
                device_ids=tuple(device_ids),
                round_id=round_id,
                parent_version=parent_version,
                created_at=self._clock(),
                file=relative.as_posix(),
                sha256=digest,
                cluster=cluster,
            )
            self._insert(meta)
        return meta

    def get(
        self, cohort: str, version: int, *, base_model_hash: str | None = None
    ) -> StoredAdapter:
        meta = self._require_meta(cohort, version)
        if base_model_hash is not None and base_model_hash != meta.base_model_hash:
            raise BaseModelMismatchError(
                f"{cohort} v{version} was trained on base model {meta.base_model_hash[:12]}, "
                f"not {base_model_hash[:12]}"
            )
        return StoredAdapter(meta, self._read_npz(meta))

    def current(
        self, cohort: str, cluster: str = WHOLE_COHORT, *, base_model_hash: str | None = None
    ) -> StoredAdapter | None:
        version = self.current_version(cohort, cluster)
        if version is None:
            return None
        return self.get(cohort, version, base_model_hash=base_model_hash)

    def current_version(self, cohort: str, cluster: str = WHOLE_COHORT) -> int | None:
        row = self._db.query_one(
            "SELECT version FROM cluster_adapters WHERE cohort = ? AND cluster = ?",
            (cohort, cluster),
        )
        return None if row is None else int(row["version"])

    def current_versions(self, cohort: str) -> dict[str, int]:
        """Every cluster's current version in the cohort."""
        rows = self._db.query(
            "SELECT cluster, version FROM cluster_adapters WHERE cohort = ? ORDER BY cluster",
            (cohort,),
        )
        return {r["cluster"]: int(r["version"]) for r in rows}

    def set_current(self, cohort: str, version: int | None, cluster: str = WHOLE_COHORT) -> None:
        """Points the cluster at a stored version (None: back to the bare base model)."""
        with self._db.transaction():
            if version is None:
                self._db.execute(
                    "DELETE FROM cluster_adapters WHERE cohort = ? AND cluster = ?",
                    (cohort, cluster),
                )
                return
            self._require_meta(cohort, version)
            self._db.execute(
                "INSERT INTO cluster_adapters VALUES (?, ?, ?, ?) ON CONFLICT(cohort, cluster) "
                "DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
                (cohort, cluster, version, self._clock()),
            )

    def cohorts(self) -> list[str]:
        """Every cohort with at least one stored version."""
        rows = self._db.query("SELECT DISTINCT cohort FROM adapters ORDER BY cohort")
        return [r["cohort"] for r in rows]

    def latest_version(self, cohort: str) -> int | None:
        row = self._db.query_one(
            "SELECT MAX(version) AS v FROM adapters WHERE cohort = ?", (cohort,)
        )
        return None if row is None or row["v"] is None else int(row["v"])

    def meta(self, cohort: str, version: int) -> AdapterVersion | None:
        row = self._db.query_one(
            "SELECT * FROM adapters WHERE cohort = ? AND version = ?", (cohort, version)
        )
        return None if row is None else _meta_from_row(row)

    def cluster_of(self, cohort: str, version: int) -> str | None:
        """The cluster a stored version was trained for (None: no such version), without
        reading its meta (whose list of devices is a fleet's worth of ids)."""
        row = self._db.query_one(
            "SELECT cluster FROM adapters WHERE cohort = ? AND version = ?", (cohort, version)
        )
        return None if row is None else (row["cluster"] or WHOLE_COHORT)

    def versions(self, cohort: str) -> list[AdapterVersion]:
        rows = self._db.query("SELECT * FROM adapters WHERE cohort = ? ORDER BY version", (cohort,))
        return [_meta_from_row(r) for r in rows]

    def lineage(self, cohort: str, version: int) -> list[AdapterVersion]:
        """This version, its parent, its parent's parent, ... back to the first."""
        chain = [self._require_meta(cohort, version)]
        while chain[-1].parent_version is not None:
            chain.append(self._require_meta(cohort, chain[-1].parent_version))
        return chain

    def base_model_hash(self, cohort: str) -> str | None:
        row = self._db.query_one(
            "SELECT base_model_hash FROM adapters WHERE cohort = ? ORDER BY version LIMIT 1",
            (cohort,),
        )
        return None if row is None else row["base_model_hash"]

    # ---- internals

    def _check_base_model(self, cohort: str, base_model_hash: str) -> None:
        if not base_model_hash:
            raise AdapterStoreError(f"{cohort}: empty base-model hash")
        bound = self.base_model_hash(cohort)
        if bound is not None and bound != base_model_hash:
            raise BaseModelMismatchError(
                f"cohort {cohort} is bound to base model {bound[:12]}, "
                f"refusing an adapter for {base_model_hash[:12]}"
            )

    def _require_meta(self, cohort: str, version: int) -> AdapterVersion:
        meta = self.meta(cohort, version)
        if meta is None:
            raise AdapterStoreError(f"cohort {cohort} has no adapter version {version}")
        return meta

    def _insert(self, meta: AdapterVersion) -> None:
        self._db.execute(
            "INSERT INTO adapters (cohort, version, base_model_hash, algorithm, device_ids, "
            "round_id, parent_version, created_at, file, sha256, cluster) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                meta.cohort,
                meta.version,
                meta.base_model_hash,
                meta.algorithm,
                json.dumps(list(meta.device_ids)),
                meta.round_id,
                meta.parent_version,
                meta.created_at,
                meta.file,
                meta.sha256,
                meta.cluster,
            ),
        )

    def _read_npz(self, meta: AdapterVersion) -> dict[str, np.ndarray]:
        path = self._state_dir / meta.file
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta.sha256:
            raise AdapterStoreError(f"{path}: content does not match its recorded sha256")
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}


def _write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Writes atomically (temp file, fsync, rename) and returns the content's sha256."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **{k: np.asarray(v) for k, v in arrays.items()})
    content = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return hashlib.sha256(content).hexdigest()


def _check_cohort(cohort: str) -> None:
    if not COHORT.fullmatch(cohort):
        raise AdapterStoreError(f"cohort {cohort!r} must match {COHORT.pattern}")


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    if not arrays:
        raise AdapterStoreError("refusing to store an adapter without arrays")
    for name, array in arrays.items():
        if not ARRAY_NAME.fullmatch(name):
            raise AdapterStoreError(f"array name {name!r} must match {ARRAY_NAME.pattern}")
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
            raise AdapterStoreError(f"array {name} must be a numeric ndarray")
        if not np.isfinite(array).all():
            raise AdapterStoreError(f"array {name} contains NaN or infinite values")


_META_COLUMNS = (
    "cohort", "version", "base_model_hash", "algorithm", "device_ids", "round_id",
    "parent_version", "created_at", "file", "sha256", "cluster",
)  # fmt: skip


def _meta_from_row(row: Any) -> AdapterVersion:
    return _parsed_meta(tuple(row[name] for name in _META_COLUMNS))


@functools.lru_cache(maxsize=256)
def _parsed_meta(values: tuple[Any, ...]) -> AdapterVersion:
    """A row's AdapterVersion, parsed once for the same values: every apply status of a
    rollout reads its version's meta, and decoding its thousand device ids each time was most
    of that. AdapterVersion is immutable; a different row is different values."""
    (cohort, version, base_hash, algorithm, device_ids, round_id, parent, created, file, sha256,
     cluster) = values  # fmt: skip
    return AdapterVersion(
        cohort=cohort,
        version=int(version),
        base_model_hash=base_hash,
        algorithm=algorithm,
        device_ids=tuple(json.loads(device_ids)),
        round_id=round_id,
        parent_version=parent,
        created_at=created,
        file=file,
        sha256=sha256,
        cluster=cluster or WHOLE_COHORT,
    )
