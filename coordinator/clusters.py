"""The clusters of each cohort: who shares an adapter, checkpointed to SQLite.

A federated run re-clusters its cohort when it starts (coordinator.clustering on the labelled
devices' signatures); a device that has no labels, or arrives later, is placed in the nearest
cluster by its signature. Every placement records how it was made, so an operator can ask why a
device runs its cluster's adapter. Rules:
- clustering off (`max_distance` None), or no labelled device with a signature yet (old agents,
  base models without calibration): the whole cohort is one cluster, WHOLE_COHORT;
- a labelled device without a signature joins the largest cluster (it measures every adapter
  on its own hold-out before it runs it, so a wrong cluster cannot make it worse);
- a device without labels and without a signature, or whose signature is near no cluster, is
  in none: nothing is rolled out to it that it cannot judge.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.adapter_store import WHOLE_COHORT
from coordinator.clock import Clock, system_clock
from coordinator.clustering import assign, carry_over_ids, cluster_signatures, rms_distance
from coordinator.hot_rows import HotRows
from coordinator.registry import DeviceRecord
from coordinator.state_db import StateDB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_members (
    cohort TEXT NOT NULL,
    device_id TEXT NOT NULL,
    cluster TEXT,
    how TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (cohort, device_id)
);
CREATE TABLE IF NOT EXISTS cluster_centroids (
    cohort TEXT NOT NULL,
    cluster TEXT NOT NULL,
    centroid BLOB,
    at REAL NOT NULL,
    PRIMARY KEY (cohort, cluster)
);
CREATE TABLE IF NOT EXISTS cluster_ids (
    cohort TEXT PRIMARY KEY,
    next INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Placement:
    device_id: str
    cluster: str | None  # None: in no cluster
    how: str  # why, in words


@dataclass(frozen=True)
class _Member:
    """A row of cluster_members: a device's placement in its cohort, and when it was made."""

    cohort: str
    placement: Placement
    at: float


_SEP = "\x00"  # never in a device id (shared.topics): a key splits back at its last one
_UPSERT_MEMBER = (
    "INSERT INTO cluster_members VALUES (?, ?, ?, ?, ?) ON CONFLICT(cohort, device_id) "
    "DO UPDATE SET cluster = excluded.cluster, how = excluded.how, at = excluded.at"
)


def _key(cohort: str, device_id: str) -> str:
    return f"{cohort}{_SEP}{device_id}"


def _member_params(m: _Member) -> tuple[str, str, str | None, str, float]:
    p = m.placement
    return (m.cohort, p.device_id, p.cluster, p.how, m.at)


def _by_cluster(p: Placement) -> tuple[str, str]:
    return (p.cluster or "", p.device_id)


class CohortClusters:
    """One cohort's placements, cluster members and centroids as a pass over its devices sees
    them (the scan's, every 5 s): each read once, when first needed. Read per device, they made
    a pass quadratic: 6,000 devices with 1,000 that no cluster takes, 7.7 s of the actor's CPU a
    scan. What the pass places itself is not in them (nor, as before, in the centroids).
    `one_by_one`: a view for devices placed one at a time (new devices joining in an ingest
    batch): the members and centroids are read once, each device's placement from its row."""

    def __init__(
        self,
        book: ClusterBook,
        cohort: str,
        records: Callable[[], Sequence[DeviceRecord]],
        *,
        one_by_one: bool = False,
    ) -> None:
        self._book, self.cohort, self._records = book, cohort, records
        self._one_by_one = one_by_one

    def placement(self, device_id: str) -> Placement | None:
        if self._one_by_one:
            return self._book.placement(self.cohort, device_id)
        return self._placed.get(device_id)

    @functools.cached_property
    def _placed(self) -> dict[str, Placement]:
        return self._book.placed_in(self.cohort)

    @functools.cached_property
    def members(self) -> dict[str, tuple[str, ...]]:
        return self._book.clusters(self.cohort)

    @functools.cached_property
    def centroids(self) -> dict[str, np.ndarray]:
        return self._book.centroids_now(self.cohort, self._records(), self.members)


class ClusterBook:
    def __init__(
        self, db: StateDB, *, max_distance: float | None, clock: Clock = system_clock
    ) -> None:
        self._db = db
        self._clock = clock
        self.max_distance = max_distance
        db.ensure_schema(_SCHEMA)
        # Every placement, in memory beside its table (coordinator.hot_rows): the scan (every
        # 5 s) reads a cohort's, the metrics snapshot and the devices view every one. Read from
        # SQLite they were ~2.5 % of the fleet actor's CPU in a 10,000-device round.
        rows = db.query("SELECT cohort, device_id, cluster, how, at FROM cluster_members")
        self._members: HotRows[_Member] = HotRows(
            db,
            {
                _key(c, d): _Member(c, Placement(d, cluster, how), at)
                for c, d, cluster, how, at in rows
            },
            upsert=(_UPSERT_MEMBER, _member_params),
            delete="DELETE FROM cluster_members WHERE cohort = ? AND device_id = ?",
            delete_params=lambda key: tuple(key.rsplit(_SEP, 1)),
            group=lambda member: member.cohort,
        )

    # ---- reads

    def placement(self, cohort: str, device_id: str) -> Placement | None:
        member = self._members.get(_key(cohort, device_id))
        return None if member is None else member.placement

    def placed_in(self, cohort: str) -> dict[str, Placement]:
        """The cohort's placements by device, for a pass over its members (the scan's)."""
        return {m.placement.device_id: m.placement for m in self._in(cohort)}

    def placements(self) -> dict[tuple[str, str], Placement]:
        """Every placement, by (cohort, device), for a whole-fleet view. A placement that has
        not changed is the same object (the metrics snapshot, every 2 s, reuses what it derived
        from it)."""
        return {(m.cohort, m.placement.device_id): m.placement for m in self._members.values()}

    def cluster_of(self, cohort: str, device_id: str) -> str | None:
        placed = self.placement(cohort, device_id)
        return None if placed is None else placed.cluster

    def clusters(self, cohort: str) -> dict[str, tuple[str, ...]]:
        """Each cluster's members, by id; clusters in order of their ids."""
        out: dict[str, list[str]] = {}
        for p in sorted((m.placement for m in self._in(cohort)), key=_by_cluster):
            if p.cluster is not None:
                out.setdefault(p.cluster, []).append(p.device_id)
        return {cluster: tuple(members) for cluster, members in out.items()}

    def labelled_members(
        self, cohort: str, records: Sequence[DeviceRecord]
    ) -> dict[str, frozenset[str]]:
        """Each cluster's members that have labels (the ones its canaries are drawn from)."""
        labelled = {r.device_id for r in records if r.labelled}
        return {
            cluster: frozenset(m for m in members if m in labelled)
            for cluster, members in self.clusters(cohort).items()
        }

    def centroids(self, cohort: str) -> dict[str, np.ndarray]:
        rows = self._db.query(
            "SELECT cluster, centroid FROM cluster_centroids WHERE cohort = ? AND centroid IS "
            "NOT NULL",
            (cohort,),
        )
        return {r["cluster"]: np.frombuffer(r["centroid"], dtype="<f8") for r in rows}

    # ---- updates

    def recluster(self, cohort: str, records: Sequence[DeviceRecord]) -> list[Placement]:
        """Clusters the cohort afresh from its members' signatures; returns every placement."""
        with self._db.transaction():
            previous = {c: frozenset(m) for c, m in self.clusters(cohort).items()}
            placements, centroids = self._cluster(cohort, records, previous)
            placed_before = self.placed_in(cohort)
            for device in placed_before:
                self._members.put(_key(cohort, device), None)
            self._db.execute("DELETE FROM cluster_centroids WHERE cohort = ?", (cohort,))
            at = self._clock()
            for p in placements:  # put after the deletes above: these are what is kept
                before = placed_before.get(p.device_id)
                # unchanged: the same object, so the views derive nothing again from it
                kept = before if before is not None and before == p else p
                self._members.put(_key(cohort, p.device_id), _Member(cohort, kept, at))
            for cluster, centroid in centroids.items():
                blob = None if centroid is None else np.asarray(centroid, "<f8").tobytes()
                self._db.execute(
                    "INSERT INTO cluster_centroids VALUES (?, ?, ?, ?)", (cohort, cluster, blob, at)
                )
        return placements

    def centroids_now(
        self,
        cohort: str,
        records: Sequence[DeviceRecord],
        members: Mapping[str, tuple[str, ...]] | None = None,
    ) -> dict[str, np.ndarray]:
        """Each cluster's centroid where its members' signatures are now (`records`: the
        cohort's, as they are now), else where it was stored at the last re-clustering: a run
        can start before a drift has filled the members' windows, and signatures move with it.
        `members`: clusters(cohort), if the caller has read it."""
        members = self.clusters(cohort) if members is None else members
        return self.centroids(cohort) | current_centroids(members, records)

    def place(self, record: DeviceRecord, view: CohortClusters) -> Placement:
        """Places one device not yet in a cluster (it joined after the last re-clustering, or
        was placed in none), by where its cohort's clusters are now (`view`). A placement the
        same as the device's last (a device still near no cluster) is not written again."""
        placement = self._place_one(record, view.members, view.centroids)
        if view.placement(record.device_id) != placement:
            self._save(view.cohort, placement, self._clock())  # in a transaction of its own
        return placement

    # ---- internals

    def _cluster(
        self,
        cohort: str,
        records: Sequence[DeviceRecord],
        previous: Mapping[str, frozenset[str]],
    ) -> tuple[list[Placement], Mapping[str, np.ndarray | None]]:
        labelled = labelled_signatures(records)
        if self.max_distance is None or not labelled:
            why = "clustering is off" if self.max_distance is None else "no signatures yet"
            how = f"the whole cohort ({why})"
            return [Placement(r.device_id, WHOLE_COHORT, how) for r in records], {
                WHOLE_COHORT: None
            }
        found = carry_over_ids(
            previous, cluster_signatures(labelled, max_distance=self.max_distance),
            lambda: self._new_id(cohort),
        )  # fmt: skip
        placements = [
            Placement(d, cluster, "clustered by signature")
            for cluster, c in found.items()
            for d in c.members
        ]
        centroids = {cluster: c.centroid for cluster, c in found.items()}
        members = {cluster: c.members for cluster, c in found.items()}
        for r in records:
            if r.device_id not in labelled:
                placements.append(self._place_one(r, members, centroids))
        return placements, centroids

    def _place_one(
        self,
        record: DeviceRecord,
        members: Mapping[str, Sequence[str]],
        centroids: Mapping[str, np.ndarray],
    ) -> Placement:
        if WHOLE_COHORT in members:
            return Placement(record.device_id, WHOLE_COHORT, "the whole cohort")
        if not members:
            return Placement(record.device_id, None, "no clusters yet")
        signature = record.signature_vector()
        if signature is None:
            if record.labelled and members:
                largest = max(sorted(members), key=lambda c: len(members[c]))
                return Placement(record.device_id, largest, "no signature: the largest cluster")
            return Placement(record.device_id, None, "no signature and no labels: no cluster")
        vector = signature.astype(np.float64)
        chosen = assign(vector, centroids, max_distance=self.max_distance or 0.0)
        if chosen is None:
            return Placement(record.device_id, None, f"no cluster within {self.max_distance}")
        distance = rms_distance(vector, centroids[chosen])
        return Placement(record.device_id, chosen, f"nearest cluster ({distance:.2f} away)")

    def _save(self, cohort: str, placement: Placement, at: float) -> None:
        with self._db.transaction():
            self._members.put(_key(cohort, placement.device_id), _Member(cohort, placement, at))

    def _in(self, cohort: str) -> list[_Member]:
        return self._members.values_in(cohort)

    def _new_id(self, cohort: str) -> str:
        row = self._db.query_one("SELECT next FROM cluster_ids WHERE cohort = ?", (cohort,))
        number = 1 if row is None else int(row["next"])
        self._db.execute(
            "INSERT INTO cluster_ids VALUES (?, ?) ON CONFLICT(cohort) DO UPDATE SET next = ?",
            (cohort, number + 1, number + 1),
        )
        return f"c{number}"


def current_centroids(
    clusters: Mapping[str, tuple[str, ...]], members: Sequence[DeviceRecord]
) -> dict[str, np.ndarray]:
    """Each cluster's mean signature over its labelled members that have one now."""
    signatures = labelled_signatures(members)
    out: dict[str, np.ndarray] = {}
    for cluster, ids in clusters.items():
        vectors = [signatures[d] for d in ids if d in signatures]  # each (H,)
        if vectors:
            out[cluster] = np.mean(vectors, axis=0)  # (H,)
    return out


def labelled_signatures(records: Iterable[DeviceRecord]) -> dict[str, np.ndarray]:
    """The float64 signatures of the labelled devices that have one, by device id."""
    out = {}
    for r in records:
        vector = r.signature_vector() if r.labelled else None  # None: no signature
        if vector is not None:
            out[r.device_id] = vector.astype(np.float64)
    return out
