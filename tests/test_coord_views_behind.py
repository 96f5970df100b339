"""Which devices are behind (coordinator.views): compared with their own cluster's current
version, else the cohort-wide one, else the cohort's newest; whatever else they run counts."""

from __future__ import annotations

import pytest

from coordinator.adapter_store import WHOLE_COHORT
from coordinator.clusters import Placement
from coordinator.registry import DeviceRecord
from coordinator.views import _behind

CURRENT = {"c0": 3, "c1": 5}  # cluster -> its current version, in the device's cohort


def record(version: int | None, origin: str | None, cohort: str = "fan") -> DeviceRecord:
    return DeviceRecord("pi-1", cohort=cohort, adapter_version=version, adapter_origin=origin)


@pytest.mark.parametrize(
    ("version", "origin", "cluster", "behind"),
    [
        (3, "fleet", "c0", False),  # its cluster's current version
        (3, "fleet", "c1", True),  # another cluster's: behind its own (v5)
        (5, "fleet", "c1", False),
        (None, "personal", "c1", True),  # kept its own fine-tune
        (None, None, "c0", True),  # the base model, never given an adapter
        (None, "base", None, True),  # in no cluster: the cohort's newest (v5) is the target
        (5, "fleet", None, False),
    ],
)
def test_a_device_is_behind_unless_it_runs_its_clusters_current_version(
    version, origin, cluster, behind
):
    placement = Placement("pi-1", cluster, "test")
    assert _behind(CURRENT, record(version, origin), placement) is behind


def test_the_cohort_wide_version_is_the_target_of_a_cluster_without_one():
    current = {WHOLE_COHORT: 2, "c1": 4}
    assert _behind(current, record(2, "fleet"), Placement("pi-1", "c0", "test")) is False
    assert _behind(current, record(4, "fleet"), Placement("pi-1", "c0", "test")) is True


def test_nobody_is_behind_in_a_cohort_without_a_version():
    assert _behind({}, record(None, None, cohort="har"), None) is False  # har: no version
