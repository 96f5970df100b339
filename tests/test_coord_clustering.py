"""Clusters from label-free signatures (DP-means), assignment of new devices, stable ids."""

import itertools

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


def test_placements_may_be_served_from_the_last_read_only_within_the_age_asked(
    tmp_path, monkeypatch
):
    from coordinator import clusters as clusters_module
    from coordinator.clusters import ClusterBook, Placement
    from coordinator.state_db import StateDB

    now = [100.0]
    monkeypatch.setattr(clusters_module.time, "monotonic", lambda: now[0])
    book = ClusterBook(StateDB(tmp_path / "s.sqlite3"), max_distance=0.4)
    book._save("fan", Placement("pi-1", "c1", "test"), 1.0)
    first = book.placements(max_age_s=10.0)
    book._save("fan", Placement("pi-1", "c2", "test"), 2.0)
    now[0] = 109.0
    assert book.placements(max_age_s=10.0) is first  # 9 s old: good enough for /metrics
    assert book.placements()[("fan", "pi-1")].cluster == "c2"  # a view asks for it now
    book._save("fan", Placement("pi-1", "c3", "test"), 3.0)
    now[0] = 120.0
    assert book.placements(max_age_s=10.0)[("fan", "pi-1")].cluster == "c3"  # 11 s: read again


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
