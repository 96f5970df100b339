"""Federated runs: what each trigger set going, cluster by cluster, checkpointed to SQLite.

A run covers one cohort. Each of its clusters goes TRAINING (a round out) → AGGREGATING (the
round's reports being averaged into the next aggregate) → TRAINING ... → ROLLING_OUT (the
candidate behind its canary) → DONE. The whole run is one JSON document per row: it is read and
written by one actor, a few times per round, and a restarted actor carries on from it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from coordinator.federation import FederationPolicy, Measured, RunProgress
from coordinator.state_db import StateDB


class ClusterStage(StrEnum):
    TRAINING = "TRAINING"
    AGGREGATING = "AGGREGATING"
    ROLLING_OUT = "ROLLING_OUT"
    DONE = "DONE"


class RunState(StrEnum):
    RUNNING = "RUNNING"
    DONE = "DONE"


@dataclass
class ClusterRun:
    cluster: str
    members: tuple[str, ...]  # the labelled devices that train
    start_version: int  # the cluster's current version when the run began (0: the base model)
    progress: RunProgress
    stage: ClusterStage = ClusterStage.TRAINING
    aggregates: dict[int, int] = field(default_factory=dict)  # round index -> stored version
    last_round: bool = False  # the aggregate under way is the last (the budget is used up)
    candidate: int | None = None  # the version to roll out
    rollout_id: str | None = None
    note: str = ""
    outliers: tuple[str, ...] = ()  # devices whose update was clipped: no canary for them
    aggregating_since: float | None = None  # when its aggregate under way was submitted

    def start_of(self, index: int) -> int:
        """The version round `index` starts from (0: the base model)."""
        return self.start_version if index == 1 else self.aggregates[index - 1]


@dataclass
class Run:
    run_id: str
    cohort: str
    trigger: str
    started_at: float
    clusters: dict[str, ClusterRun]
    state: RunState = RunState.RUNNING
    rounds: list[str] = field(default_factory=list)  # round ids, in order
    finished_at: float | None = None

    @property
    def round_index(self) -> int:
        return len(self.rounds)

    def in_stage(self, *stages: ClusterStage) -> list[ClusterRun]:
        # RunBook.running(in_stage=...) asks the same of a parsed body
        return [c for c in self.clusters.values() if c.stage in stages]

    def cluster_of(self, device_id: str) -> ClusterRun | None:
        return next((c for c in self.clusters.values() if device_id in c.members), None)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    cohort TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_cohort ON runs (cohort, state);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, started_at);
CREATE TABLE IF NOT EXISTS run_rounds (
    round_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    round_index INTEGER NOT NULL,
    starts TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_rounds_by_run ON run_rounds (run_id);
"""
# Runs are kept for --history-days (coordinator.history): every tick reads the running ones,
# and the pruning finds the ended ones and their rounds, from these indexes, not a scan.


class RunBook:
    def __init__(self, db: StateDB, policy: FederationPolicy) -> None:
        self._db = db
        self.policy = policy
        # The running runs' bodies as this thread last read them, parsed: every tick reads
        # them, and a 10,000-device run is ~0.5 MB of JSON, parsed for 3-4 % of the fleet
        # actor's CPU in a round. By run id, used only while the body's text is the same (a
        # body changed or rolled back is parsed again); per thread, as each thread's connection
        # sees its own state (the actor's writer its transaction, a query thread what is
        # committed). The parsed dicts are never handed out, only Runs built from them.
        self._threads = threading.local()
        db.ensure_schema(_SCHEMA)

    def save(self, run: Run) -> None:
        self._db.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE SET "
            "state = excluded.state, body = excluded.body",
            (run.run_id, run.cohort, run.state.value, run.started_at, json.dumps(_dump(run))),
        )

    def get(self, run_id: str) -> Run | None:
        row = self._db.query_one("SELECT run_id, body FROM runs WHERE run_id = ?", (run_id,))
        return None if row is None else self._load(row)

    def active(self, cohort: str) -> Run | None:
        row = self._db.query_one(
            "SELECT run_id, body FROM runs WHERE cohort = ? AND state = ?",
            (cohort, RunState.RUNNING.value),
        )
        return None if row is None else self._load(row)

    def is_running(self, cohort: str) -> bool:
        """Whether the cohort has a run going, without building it (the scan asks, every 5 s,
        of every cohort: active() built a Run of all its members to answer)."""
        row = self._db.query_one(
            "SELECT 1 FROM runs WHERE cohort = ? AND state = ?", (cohort, RunState.RUNNING.value)
        )
        return row is not None

    def running(self, *, in_stage: Collection[ClusterStage] | None = None) -> list[Run]:
        """The running runs; `in_stage`: only those with a cluster in one of these stages
        (every tick asks for the aggregating and rolling-out ones, and a Run of 10,000 members
        costs ~5 ms to build: none is built while every cluster trains)."""
        rows = self._db.query(
            "SELECT run_id, body FROM runs WHERE state = ? ORDER BY started_at",
            (RunState.RUNNING.value,),
        )
        bodies = [self._parse(r, keep=True) for r in rows]
        parsed = self._parsed()
        for run_id in parsed.keys() - {r["run_id"] for r in rows}:  # ended: read no more
            del parsed[run_id]
        if in_stage is not None:  # as Run.in_stage, on the parsed bodies
            stages = {stage.value for stage in in_stage}
            bodies = [
                b for b in bodies if any(c["stage"] in stages for c in b["clusters"].values())
            ]
        return [_load(body, self.policy) for body in bodies]

    def running_count(self) -> int:
        """How many runs are running (/health's, without reading their bodies)."""
        row = self._db.query_one(
            "SELECT count(*) FROM runs WHERE state = ?", (RunState.RUNNING.value,)
        )
        return 0 if row is None else int(row[0])

    def _load(self, row: Any) -> Run:
        """A Run of its own from a row (run_id, body)."""
        return _load(self._parse(row), self.policy)

    def _parse(self, row: Any, *, keep: bool = False) -> dict[str, Any]:
        """A row's body, parsed again only if it is not the one last parsed; `keep` the parse
        for the next read (running runs only). Never handed out: _load copies from it."""
        run_id, text = row["run_id"], row["body"]
        parsed = self._parsed()
        last = parsed.get(run_id)
        if last is not None and last[0] == text:
            return last[1]
        body: dict[str, Any] = json.loads(text)
        if keep:
            parsed[run_id] = (text, body)
        return body

    def _parsed(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """This thread's parsed bodies: run id -> (body text, parsed)."""
        parsed: dict[str, tuple[str, dict[str, Any]]] | None = getattr(
            self._threads, "parsed", None
        )
        if parsed is None:
            parsed = self._threads.parsed = {}
        return parsed

    def recent(self, limit: int = 20) -> list[Run]:
        # newest by rowid (the order they started): read from the end, no sort of every body
        rows = self._db.query("SELECT run_id, body FROM runs ORDER BY rowid DESC LIMIT ?", (limit,))
        return [self._load(r) for r in rows]

    def add_round(self, run: Run, round_id: str, starts: Mapping[str, int]) -> None:
        """Round `run.round_index + 1` of the run is out; `starts`: each device's start version."""
        run.rounds.append(round_id)
        with self._db.transaction():
            self._db.execute(
                "INSERT INTO run_rounds VALUES (?, ?, ?, ?)",
                (round_id, run.run_id, run.round_index, json.dumps(dict(starts))),
            )
            self.save(run)

    def round_of(self, round_id: str) -> tuple[str, int, dict[str, int]] | None:
        """(run id, round index, start version per device) of a run's round, or None."""
        row = self._db.query_one("SELECT * FROM run_rounds WHERE round_id = ?", (round_id,))
        if row is None:
            return None
        return row["run_id"], int(row["round_index"]), json.loads(row["starts"])


def _dump(run: Run) -> dict[str, Any]:
    body = asdict(replace(run, clusters={}))
    body["clusters"] = {name: _dump_cluster(c) for name, c in run.clusters.items()}
    return body


def _dump_cluster(c: ClusterRun) -> dict[str, Any]:
    body = asdict(replace(c, progress=RunProgress(c.progress.policy)))  # written below
    body["aggregates"] = {str(k): v for k, v in c.aggregates.items()}
    body["progress"] = {
        "rounds_done": c.progress.rounds_done,
        "stalled": c.progress.stalled,
        "measured": {
            str(r): {d: [m.accuracy, m.loss] for d, m in by_device.items()}
            for r, by_device in c.progress.measured.items()
        },
    }
    return body


def _load(body: dict[str, Any], policy: FederationPolicy) -> Run:
    """A Run from a parsed body, which it leaves as it was and shares nothing mutable with."""
    clusters = {name: _load_cluster(c, policy) for name, c in body["clusters"].items()}
    fields = {k: v for k, v in body.items() if k != "clusters"}
    return Run(
        **{**fields, "state": RunState(body["state"]), "rounds": list(body["rounds"])},
        clusters=clusters,
    )


def _load_cluster(body: dict[str, Any], policy: FederationPolicy) -> ClusterRun:
    saved = body["progress"]
    fields = {k: v for k, v in body.items() if k != "progress"}
    progress = RunProgress(
        policy,
        measured={
            int(r): {d: Measured(*m) for d, m in by_device.items()}
            for r, by_device in saved["measured"].items()
        },
        rounds_done=saved["rounds_done"],
        stalled=saved["stalled"],
    )
    return ClusterRun(
        **{
            **fields,
            "members": tuple(body["members"]),
            "outliers": tuple(body.get("outliers", ())),
            "stage": ClusterStage(body["stage"]),
            "aggregates": {int(k): v for k, v in body["aggregates"].items()},
        },
        progress=progress,
    )


def members_of(run: Run, clusters: Iterable[ClusterRun]) -> list[str]:
    return sorted({d for c in clusters for d in c.members})
