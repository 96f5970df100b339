"""Which devices share an adapter: clusters of devices whose inputs look alike, without labels.

Every device reports a *signature* in its heartbeat: the mean, over its recent inputs, of the base
model's last hidden layer, standardised by the model's own in-distribution statistics. Distances
between signatures are root-mean-square over units, so 1.0 means "one in-distribution standard
deviation per unit": a scale set by the base model, the same for every task.

The rule is DP-means (Kulis and Jordan, "Revisiting k-means: new algorithms via Bayesian
nonparametrics", ICML 2012): k-means in which a device farther than `max_distance` from every
centroid opens a cluster of its own, so the number of clusters follows the data. Grouping
clients by statistics of their data, once and without labels, follows PACFL (Vahidian et al.,
"Efficient distribution similarity identification in clustered federated learning via
principal angles between client data subspaces", AAAI 2023); training one model per cluster
over rounds follows IFCA (Ghosh et al., "An efficient framework for clustered federated
learning", NeurIPS 2020). A device without labels, or a new one, joins the nearest cluster
within `max_distance` (`assign`).

The cost is O(devices × clusters) per pass, so it runs on 10,000 devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

MAX_PASSES = 20
# Measured on the federation benchmark (docs/benchmarks.md): 0.35-0.45 all reach the targets;
# 0.3 splits devices that should share, 0.5 and above merges noisy-room fans of different
# conditions (which then learn more slowly together).
DEFAULT_CLUSTER_DISTANCE = 0.4


@dataclass(frozen=True)
class Cluster:
    members: tuple[str, ...]  # sorted device ids
    centroid: np.ndarray  # (H,) float64: the members' mean signature


def rms_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / √H: in in-distribution standard deviations per unit."""
    return float(np.linalg.norm(a - b) / math.sqrt(a.shape[-1]))


def cluster_signatures(
    signatures: Mapping[str, np.ndarray], *, max_distance: float
) -> list[Cluster]:
    """DP-means over the devices' signatures; deterministic (devices taken in sorted order).

    Refuses signatures of different widths (they come from different models) instead of
    comparing what cannot be compared.
    """
    if max_distance <= 0:
        raise ValueError(f"max_distance must be > 0, got {max_distance}")
    if not signatures:
        return []
    devices = sorted(signatures)
    X = _stack(devices, signatures)  # (n, H)
    scale = math.sqrt(X.shape[1])
    centroids = X[:1].copy()  # (k, H)
    labels = np.zeros(len(devices), dtype=np.intp)
    for _ in range(MAX_PASSES):
        previous = labels.copy()
        for i, x in enumerate(X):  # DP-means assignment: open a cluster when nothing is near
            distance = np.linalg.norm(centroids - x, axis=1) / scale  # (k,)
            nearest = int(distance.argmin())
            if distance[nearest] > max_distance:
                centroids = np.vstack([centroids, x])
                nearest = len(centroids) - 1
            labels[i] = nearest
        used = np.unique(labels)
        labels = np.searchsorted(used, labels)  # drop clusters left empty
        centroids = np.stack([X[labels == k].mean(axis=0) for k in range(len(used))])
        if np.array_equal(labels, previous):
            break
    return [
        Cluster(tuple(d for d, label in zip(devices, labels, strict=True) if label == k), c)
        for k, c in enumerate(centroids)
    ]


def assign(
    signature: np.ndarray, centroids: Mapping[str, np.ndarray], *, max_distance: float
) -> str | None:
    """The nearest cluster within max_distance (ties: the first id in sorted order), or None."""
    best, best_distance = None, max_distance
    for cluster_id in sorted(centroids):
        centroid = centroids[cluster_id]
        if centroid.shape != signature.shape:
            continue  # another model's signature space: not comparable
        distance = rms_distance(signature, centroid)
        if distance <= best_distance:
            best, best_distance = cluster_id, distance
    return best


def carry_over_ids(
    previous: Mapping[str, frozenset[str]], clusters: list[Cluster], new_id: Callable[[], str]
) -> dict[str, Cluster]:
    """Names the new clusters: each keeps the id of the previous cluster it shares the most
    members with (each old id used once; larger overlaps first), else gets new_id().

    Keeps a cluster's adapter lineage across re-clustering when its membership shifts a little.
    """
    overlaps = sorted(
        (
            (-len(set(c.members) & members), old_id, index)
            for index, c in enumerate(clusters)
            for old_id, members in previous.items()
            if set(c.members) & members
        ),
    )
    named: dict[int, str] = {}
    used: set[str] = set()
    for _, old_id, index in overlaps:
        if index not in named and old_id not in used:
            named[index] = old_id
            used.add(old_id)
    return {named.get(i) or new_id(): c for i, c in enumerate(clusters)}


def _stack(devices: list[str], signatures: Mapping[str, np.ndarray]) -> np.ndarray:
    rows = [np.asarray(signatures[d], dtype=np.float64) for d in devices]
    widths = {r.shape for r in rows}
    if len(widths) != 1 or rows[0].ndim != 1:
        raise ValueError(f"signatures must be vectors of one width, got shapes {sorted(widths)}")
    X = np.stack(rows)
    if not np.isfinite(X).all():
        raise ValueError("signatures must be finite")
    return X
