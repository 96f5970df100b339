"""Clusters from label-free signatures (DP-means), assignment of new devices, stable ids."""

import itertools
import threading

import numpy as np
import pytest

from coordinator.clustering import (
    Cluster,
    assign,
    carry_over_ids,
    cluster_signatures,
    rms_distance,
)

H = 96


def group(center: float, n: int, rng, spread=0.05, prefix="d"):
    """n signatures around a point at `center` in every unit (rms distance to it ~ spread)."""
    return {f"{prefix}{i}": center + spread * rng.standard_normal(H) for i in range(n)}


def test_rms_distance_is_in_standard_deviations_per_unit():
    assert rms_distance(np.zeros(H), np.full(H, 0.5)) == pytest.approx(0.5)


def test_two_groups_farther_apart_than_the_radius_become_two_clusters():
    rng = np.random.default_rng(0)
    signatures = {**group(0.0, 5, rng, prefix="quiet"), **group(1.0, 4, rng, prefix="noisy")}
    clusters = cluster_signatures(signatures, max_distance=0.4)
    assert sorted(c.members for c in clusters) == [
        tuple(f"noisy{i}" for i in range(4)),
        tuple(f"quiet{i}" for i in range(5)),
    ]
    for c in clusters:  # each centroid is its members' mean
        np.testing.assert_allclose(c.centroid, np.mean([signatures[d] for d in c.members], 0))


def test_one_spread_group_stays_one_cluster_and_the_result_does_not_depend_on_order():
    rng = np.random.default_rng(1)
    signatures = group(0.3, 12, rng, spread=0.15)
    clusters = cluster_signatures(signatures, max_distance=0.4)
    assert [c.members for c in clusters] == [tuple(sorted(signatures))]
    shuffled = dict(reversed(list(signatures.items())))
    assert [c.members for c in cluster_signatures(shuffled, max_distance=0.4)] == [
        c.members for c in clusters
    ]


def test_every_device_is_in_exactly_one_cluster_within_the_radius_of_its_centroid():
    rng = np.random.default_rng(2)
    signatures = {f"d{i}": rng.uniform(-1, 1) + 0.2 * rng.standard_normal(H) for i in range(60)}
    clusters = cluster_signatures(signatures, max_distance=0.3)
    members = list(itertools.chain.from_iterable(c.members for c in clusters))
    assert sorted(members) == sorted(signatures)
    for c in clusters:
        assert all(rms_distance(signatures[d], c.centroid) <= 0.3 + 1e-9 for d in c.members)


def test_signatures_of_different_widths_or_not_finite_are_refused():
    with pytest.raises(ValueError, match="one width"):
        cluster_signatures({"a": np.zeros(H), "b": np.zeros(H - 1)}, max_distance=0.4)
    with pytest.raises(ValueError, match="finite"):
        cluster_signatures({"a": np.full(H, np.nan)}, max_distance=0.4)
    with pytest.raises(ValueError, match="max_distance"):
        cluster_signatures({"a": np.zeros(H)}, max_distance=0.0)
    assert cluster_signatures({}, max_distance=0.4) == []


def test_a_new_device_joins_the_nearest_cluster_within_the_radius_or_none():
    centroids = {"c1": np.zeros(H), "c2": np.ones(H)}
    assert assign(np.full(H, 0.9), centroids, max_distance=0.4) == "c2"
    assert assign(np.full(H, 0.1), centroids, max_distance=0.4) == "c1"
    assert assign(np.full(H, 0.5), centroids, max_distance=0.4) is None  # near neither
    assert assign(np.zeros(H - 1), centroids, max_distance=0.4) is None  # another model


def test_new_clusters_keep_the_ids_of_the_clusters_they_overlap_most():
    previous = {"c1": frozenset({"a", "b", "c"}), "c2": frozenset({"x", "y"})}
    fresh = iter(["c3", "c4"])
    clusters = [
        Cluster(("x", "y", "z"), np.zeros(H)),  # mostly the old c2
        Cluster(("a", "b"), np.zeros(H)),  # mostly the old c1
        Cluster(("q",), np.zeros(H)),  # nobody's: a new id
    ]
    named = carry_over_ids(previous, clusters, lambda: next(fresh))
    assert {k: v.members for k, v in named.items()} == {
        "c2": ("x", "y", "z"),
        "c1": ("a", "b"),
        "c3": ("q",),
    }


def test_placements_are_kept_in_memory_an_unchanged_one_the_same_object_and_durable(tmp_path):
    from coordinator.clusters import ClusterBook, Placement
    from coordinator.state_db import StateDB

    book = ClusterBook(StateDB(tmp_path / "s.sqlite3"), max_distance=0.4)
    book._save("fan", Placement("pi-1", "c1", "test"), 1.0)
    book._save("fan", Placement("pi-2", "c1", "test"), 1.0)
    first = book.placements()
    book._save("fan", Placement("pi-1", "c2", "test"), 2.0)
    now = book.placements()
    assert now[("fan", "pi-1")].cluster == "c2"  # a view sees it at once: no lag
    assert now[("fan", "pi-2")] is first[("fan", "pi-2")]  # the snapshot reuses what it derived
    again = ClusterBook(StateDB(tmp_path / "s.sqlite3"), max_distance=0.4)  # a restart
    assert again.placements() == now and again.clusters("fan") == {"c1": ("pi-2",), "c2": ("pi-1",)}


def test_a_recluster_that_rolls_back_leaves_the_placements_as_they_were(tmp_path):
    from coordinator.clusters import ClusterBook, Placement
    from coordinator.registry import FleetRegistry
    from coordinator.state_db import StateDB

    def reopened() -> ClusterBook:
        return ClusterBook(StateDB(tmp_path / "s.sqlite3"), max_distance=None)

    db = StateDB(tmp_path / "s.sqlite3")
    registry = FleetRegistry(db)
    records = [registry.register("pi-1", base_model_hash="ab" * 32, task="fan")]
    book = ClusterBook(db, max_distance=None)  # clustering off: one cluster, the whole cohort
    book._save("fan", Placement("pi-1", "c1", "test"), 1.0)
    book._save("fan", Placement("gone", "c1", "test"), 1.0)  # no longer in the cohort
    before = book.placements()
    seen: dict[str, set[str]] = {}
    with pytest.raises(RuntimeError), db.transaction():
        book.recluster("fan", records)
        assert set(book.placed_in("fan")) == {"pi-1"}  # its own writes, in its transaction
        reader = threading.Thread(target=lambda: seen.update(fan=set(book.placed_in("fan"))))
        reader.start()
        reader.join()
        raise RuntimeError("rolled back")
    assert seen["fan"] == {"pi-1", "gone"}  # another thread: the committed placements
    assert book.placements() == before == reopened().placements()
    book.recluster("fan", records)
    assert set(book.placed_in("fan")) == {"pi-1"} == set(reopened().placed_in("fan"))
    first = book.placed_in("fan")["pi-1"]
    book.recluster("fan", records)  # the same placement again: the same object, for the views
    assert book.placed_in("fan")["pi-1"] is first


def test_a_cohorts_placements_read_at_once_are_each_devices_own_and_no_other_cohorts(tmp_path):
    from coordinator.clusters import ClusterBook, Placement
    from coordinator.state_db import StateDB

    book = ClusterBook(StateDB(tmp_path / "s.sqlite3"), max_distance=0.4)
    book._save("fan", Placement("pi-1", "c1", "nearest"), 1.0)
    book._save("fan", Placement("pi-2", None, "no signature yet"), 1.0)
    book._save("har", Placement("pi-3", "c1", "nearest"), 1.0)
    placed = book.placed_in("fan")
    assert placed == {d: book.placement("fan", d) for d in ("pi-1", "pi-2")}
    assert placed["pi-2"].cluster is None and book.placed_in("none") == {}
