"""Canary distribution of a new fleet adapter, with automatic promotion or rollback.

CANARY → PROMOTED | ROLLED_BACK (both final). A candidate version goes first to a canary fraction
of the cohort (at least one device). Each canary evaluates the candidate and its current adapter
on its own hold-out data. When every canary has reported, the rollout is promoted if the mean
accuracy with the candidate is no worse than with the current adapter minus a margin, and no
single canary loses more than a per-device margin (a candidate that helps one device as much as
it wrecks another leaves the mean alone, and must still not ship). A canary
that fails rolls back at once; one that has not reported by the deadline makes the rollout roll
back then. The cohort's current pointer in the AdapterStore only moves on promotion, so a rollback
leaves it on the previous version; canary devices are told to return to it (desired_version).
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from coordinator.adapter_store import WHOLE_COHORT, AdapterStore
from coordinator.clock import Clock, system_clock
from coordinator.state_db import StateDB


class RolloutState(StrEnum):
    CANARY = "CANARY"
    PROMOTED = "PROMOTED"
    ROLLED_BACK = "ROLLED_BACK"


class RolloutError(ValueError):
    pass


@dataclass(frozen=True)
class RolloutPolicy:
    canary_fraction: float = 0.1
    # Promote when mean(candidate) >= mean(current) - max_accuracy_regression (fractions)...
    max_accuracy_regression: float = 0.01
    # ...and no canary's own candidate accuracy is below its current one minus this.
    max_device_regression: float = 0.05
    canary_deadline_s: float = 900.0
    # A decision never rests on fewer canaries than this: a cohort with fewer reachable
    # devices able to measure gets no canary (and no promotion) at all.
    min_canaries: int = 1

    def __post_init__(self) -> None:
        if self.min_canaries < 1:
            raise ValueError(f"min_canaries must be >= 1, got {self.min_canaries}")
        if not 0.0 < self.canary_fraction <= 1.0:
            raise ValueError(f"canary_fraction must be in (0, 1], got {self.canary_fraction}")
        if self.max_accuracy_regression < 0 or self.max_device_regression < 0:
            raise ValueError("max_accuracy_regression and max_device_regression must be >= 0")
        if self.canary_deadline_s <= 0:
            raise ValueError("canary_deadline_s must be > 0")


@dataclass(frozen=True)
class CanaryResult:
    device_id: str
    accuracy_candidate: float | None = None
    accuracy_current: float | None = None
    failure: str | None = None


@dataclass(frozen=True)
class Rollout:
    rollout_id: str
    cohort: str
    candidate_version: int
    previous_version: int | None  # None: the cohort ran the bare base model
    canary_devices: tuple[str, ...]
    started_at: float
    deadline: float
    state: RolloutState = RolloutState.CANARY
    results: Mapping[str, CanaryResult] = field(default_factory=dict)
    decided_at: float | None = None
    reason: str | None = None
    cluster: str = WHOLE_COHORT  # the cluster of the cohort whose current version it moves

    @property
    def is_decided(self) -> bool:
        return self.state is not RolloutState.CANARY

    def desired_version(self, device_id: str) -> int | None:
        """The adapter version this cohort member should run now."""
        if self.state is RolloutState.PROMOTED:
            return self.candidate_version
        if self.state is RolloutState.CANARY and device_id in self.canary_devices:
            return self.candidate_version
        return self.previous_version

    def desired_versions(self, device_ids: Iterable[str]) -> dict[str, int | None]:
        return {device: self.desired_version(device) for device in device_ids}


# Parsed canary lists kept (one per rollout read recently; a few KB each at 1,000 canaries).
_PARSED_CANARIES_KEPT = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    cohort TEXT NOT NULL,
    candidate_version INTEGER NOT NULL,
    previous_version INTEGER,
    canary_devices TEXT NOT NULL,
    started_at REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,
    decided_at REAL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS canary_results (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    accuracy_candidate REAL,
    accuracy_current REAL,
    failure TEXT,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE INDEX IF NOT EXISTS rollouts_by_state ON rollouts (state, deadline);
CREATE INDEX IF NOT EXISTS rollouts_by_cohort ON rollouts (cohort, state);
"""
# Every tick asks for the canaries past their deadline, and offers ask for a cohort's canary
# under way; rollouts are kept for good (coordinator.history), and without these indexes each
# read went through every rollout's row, its canary list included (docs/benchmarks.md).


def canary_verdict(
    results: list[CanaryResult], policy: RolloutPolicy, *, version: int
) -> tuple[RolloutState, str]:
    """Promote when the mean accuracy with the candidate is no worse than with the current
    adapter minus a margin, and no single canary loses more than the per-device margin."""
    measured = {r.device_id: _accuracies(r) for r in results}  # (candidate, current)
    candidate = sum(a for a, _ in measured.values()) / len(results)
    current = sum(a for _, a in measured.values()) / len(results)
    summary = f"mean accuracy {candidate:.4f} with v{version} vs {current:.4f}"
    margin = policy.max_accuracy_regression
    if candidate < current - margin:
        return RolloutState.ROLLED_BACK, f"{summary}: regression beyond {margin:.4f}"
    worst = min(results, key=lambda r: measured[r.device_id][0] - measured[r.device_id][1])
    drop = measured[worst.device_id][1] - measured[worst.device_id][0]
    if drop > policy.max_device_regression:
        return RolloutState.ROLLED_BACK, (
            f"{summary}, but {worst.device_id} regresses by {drop:.4f} "
            f"(device margin {policy.max_device_regression:.4f})"
        )
    return RolloutState.PROMOTED, summary


def _accuracies(result: CanaryResult) -> tuple[float, float]:
    """(candidate, current) of a canary that answered: a failed one never reaches a verdict."""
    if result.accuracy_candidate is None or result.accuracy_current is None:
        raise ValueError(f"canary {result.device_id} reported no accuracies")
    return result.accuracy_candidate, result.accuracy_current


class RolloutManager:
    def __init__(
        self,
        db: StateDB,
        store: AdapterStore,
        *,
        policy: RolloutPolicy | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.policy = policy or RolloutPolicy()
        self._db = db
        self._store = store
        self._clock = clock
        self._parsed_canaries: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {}
        db.ensure_schema(_SCHEMA)
        db.add_missing_columns("rollouts", {"cluster": "TEXT"})

    def start(
        self,
        cohort: str,
        candidate_version: int,
        device_ids: Iterable[str],
        *,
        cluster: str = WHOLE_COHORT,
        rollout_id: str | None = None,
    ) -> Rollout:
        """Starts a canary over the given members of the cluster (pass those able to measure
        now); fewer than min_canaries of them is refused."""
        devices = sorted(set(device_ids))
        where = f"cohort {cohort} cluster {cluster}"
        if len(devices) < self.policy.min_canaries:
            raise RolloutError(
                f"{where}: {len(devices)} device(s) able to measure, the canary needs "
                f"{self.policy.min_canaries}"
            )
        with self._db.transaction():
            if self._store.meta(cohort, candidate_version) is None:
                raise RolloutError(f"cohort {cohort} has no adapter version {candidate_version}")
            running = self.active(cohort, cluster)
            if running is not None:
                raise RolloutError(f"{where} already has rollout {running.rollout_id}")
            previous = self._store.current_version(cohort, cluster)
            if previous == candidate_version:
                raise RolloutError(f"{cohort} v{candidate_version} is already current")
            rollout_id = rollout_id or uuid.uuid4().hex
            now = self._clock()
            rollout = Rollout(
                rollout_id=rollout_id,
                cohort=cohort,
                candidate_version=candidate_version,
                previous_version=previous,
                canary_devices=self._pick_canaries(rollout_id, devices),
                started_at=now,
                deadline=now + self.policy.canary_deadline_s,
                cluster=cluster,
            )
            self._insert(rollout)
        return rollout

    def record_result(
        self,
        rollout_id: str,
        device_id: str,
        *,
        accuracy_candidate: float,
        accuracy_current: float,
    ) -> Rollout | None:
        """A canary's hold-out accuracy with the candidate and with its current adapter.

        Returns the rollout once decided (by this result or before: a result that arrives after
        the decision changes nothing), None while its canary is still under way (a repeated
        result changes nothing either).
        """
        for value in (accuracy_candidate, accuracy_current):
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise RolloutError(f"device {device_id}: accuracy must be in [0, 1], got {value}")
        result = CanaryResult(device_id, accuracy_candidate, accuracy_current)
        return self._record(rollout_id, result)

    def record_failure(self, rollout_id: str, device_id: str, reason: str) -> Rollout | None:
        """A canary could not install or evaluate the candidate: roll back now (returns the
        decided rollout; None only for a repeat while the canary is under way)."""
        return self._record(rollout_id, CanaryResult(device_id, failure=reason))

    def check_deadlines(self) -> list[Rollout]:
        """Rolls back every canary whose deadline passed without all results; returns those."""
        now = self._clock()
        decided = []
        for overdue in self._canaries(deadline_before=now):
            with self._db.transaction():
                rollout = self._require(overdue.rollout_id)
                if rollout.is_decided:
                    continue  # decided by a result that arrived meanwhile
                missing = sorted(set(rollout.canary_devices) - set(rollout.results))
                reason = f"canaries {missing} did not report by the deadline"
                decided.append(self._decide(rollout, RolloutState.ROLLED_BACK, reason))
        return decided

    def get(self, rollout_id: str) -> Rollout | None:
        row = self._db.query_one("SELECT * FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return None if row is None else self._from_row(row)

    def is_undecided(self, rollout_id: str) -> bool:
        """Whether the rollout exists and its canary is still under way (one indexed read)."""
        row = self._db.query_one("SELECT state FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return row is not None and row["state"] == RolloutState.CANARY.value

    def active(self, cohort: str, cluster: str | None = None) -> Rollout | None:
        """The cluster's canary under way (cluster None: any of the cohort's)."""
        rows = self._db.query(
            "SELECT * FROM rollouts WHERE cohort = ? AND state = ?",
            (cohort, RolloutState.CANARY.value),
        )
        for row in rows:
            rollout = self._from_row(row)
            if cluster is None or rollout.cluster == cluster:
                return rollout
        return None

    def history(self, cohort: str) -> list[Rollout]:
        rows = self._db.query(
            "SELECT * FROM rollouts WHERE cohort = ? ORDER BY started_at, rowid", (cohort,)
        )
        return [self._from_row(r) for r in rows]

    # ---- internals

    def _pick_canaries(self, rollout_id: str, devices: list[str]) -> tuple[str, ...]:
        wanted = max(
            self.policy.min_canaries, math.ceil(self.policy.canary_fraction * len(devices))
        )
        count = min(len(devices), wanted)
        # A hash of (rollout, device) spreads the canary duty over the cohort across rollouts,
        # and is reproducible, unlike random choice.
        ranked = sorted(
            devices, key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest()
        )
        return tuple(sorted(ranked[:count]))

    def _record(self, rollout_id: str, result: CanaryResult) -> Rollout | None:
        # A rollout is loaded whole (every result so far) only to decide it or to return an
        # already decided one: loading it for each result made a canary of n devices cost n²
        # row reads (1,000 canaries at 10,000 devices: 3.4-4.7 ms a result, 9 s a round).
        with self._db.transaction():
            state, canaries = self._header(rollout_id)
            if result.device_id not in canaries:
                raise RolloutError(f"{result.device_id} is not a canary of rollout {rollout_id}")
            if state is not RolloutState.CANARY:
                return self._require(rollout_id)  # decided before: a decision is final
            if self._has_result(rollout_id, result.device_id):
                return None  # a repeat
            self._db.execute(
                "INSERT INTO canary_results VALUES (?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    result.device_id,
                    result.accuracy_candidate,
                    result.accuracy_current,
                    result.failure,
                ),
            )
            if result.failure is not None:
                reason = f"canary {result.device_id} failed: {result.failure}"
                return self._decide(self._require(rollout_id), RolloutState.ROLLED_BACK, reason)
            if self._result_count(rollout_id) < len(canaries):
                return None
            rollout = self._require(rollout_id)
            return self._decide(rollout, *self._verdict(rollout))

    def _verdict(self, rollout: Rollout) -> tuple[RolloutState, str]:
        return canary_verdict(
            list(rollout.results.values()), self.policy, version=rollout.candidate_version
        )

    def _decide(self, rollout: Rollout, state: RolloutState, reason: str) -> Rollout:
        now = self._clock()
        if state is RolloutState.PROMOTED:
            self._store.set_current(rollout.cohort, rollout.candidate_version, rollout.cluster)
        self._db.execute(
            "UPDATE rollouts SET state = ?, decided_at = ?, reason = ? WHERE rollout_id = ?",
            (state.value, now, reason, rollout.rollout_id),
        )
        return self._require(rollout.rollout_id)

    def overdue(self, before: float) -> list[Rollout]:
        """Canaries still undecided whose deadline was before `before`."""
        return self._canaries(deadline_before=before)

    def _canaries(self, *, deadline_before: float) -> list[Rollout]:
        rows = self._db.query(
            "SELECT * FROM rollouts WHERE state = ? AND deadline <= ? ORDER BY deadline",
            (RolloutState.CANARY.value, deadline_before),
        )
        return [self._from_row(r) for r in rows]

    def _header(self, rollout_id: str) -> tuple[RolloutState, frozenset[str]]:
        row = self._db.query_one(
            "SELECT state, canary_devices FROM rollouts WHERE rollout_id = ?", (rollout_id,)
        )
        if row is None:
            raise RolloutError(f"unknown rollout {rollout_id}")
        return RolloutState(row["state"]), self._canaries_of(row["canary_devices"])[1]

    def _canaries_of(self, stored: str) -> tuple[tuple[str, ...], frozenset[str]]:
        """The canaries of a stored list, in order and as a set, parsed once per distinct text
        (a rollout's canaries never change; the text is the key, so an entry is never stale)."""
        canaries = self._parsed_canaries.get(stored)
        if canaries is None:
            if len(self._parsed_canaries) >= _PARSED_CANARIES_KEPT:
                self._parsed_canaries.clear()
            listed = tuple(json.loads(stored))
            canaries = self._parsed_canaries[stored] = (listed, frozenset(listed))
        return canaries

    def _has_result(self, rollout_id: str, device_id: str) -> bool:
        row = self._db.query_one(
            "SELECT 1 FROM canary_results WHERE rollout_id = ? AND device_id = ?",
            (rollout_id, device_id),
        )
        return row is not None

    def _result_count(self, rollout_id: str) -> int:
        (row,) = self._db.query(  # COUNT(*): always one row
            "SELECT COUNT(*) AS n FROM canary_results WHERE rollout_id = ?", (rollout_id,)
        )
        return int(row["n"])

    def _require(self, rollout_id: str) -> Rollout:
        rollout = self.get(rollout_id)
        if rollout is None:
            raise RolloutError(f"unknown rollout {rollout_id}")
        return rollout

    def _insert(self, rollout: Rollout) -> None:
        self._db.execute(
            "INSERT INTO rollouts (rollout_id, cohort, candidate_version, previous_version, "
            "canary_devices, started_at, deadline, state, cluster) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rollout.rollout_id,
                rollout.cohort,
                rollout.candidate_version,
                rollout.previous_version,
                json.dumps(list(rollout.canary_devices)),
                rollout.started_at,
                rollout.deadline,
                rollout.state.value,
                rollout.cluster,
            ),
        )

    def _from_row(self, row: Any) -> Rollout:
        results = {
            r["device_id"]: CanaryResult(
                r["device_id"], r["accuracy_candidate"], r["accuracy_current"], r["failure"]
            )
            for r in self._db.query(
                "SELECT * FROM canary_results WHERE rollout_id = ?", (row["rollout_id"],)
            )
        }
        return Rollout(
            rollout_id=row["rollout_id"],
            cohort=row["cohort"],
            candidate_version=row["candidate_version"],
            previous_version=row["previous_version"],
            canary_devices=self._canaries_of(row["canary_devices"])[0],
            started_at=row["started_at"],
            deadline=row["deadline"],
            state=RolloutState(row["state"]),
            results=results,
            decided_at=row["decided_at"],
            reason=row["reason"],
            cluster=row["cluster"] or WHOLE_COHORT,
        )
