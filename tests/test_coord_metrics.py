"""The coordinator's Prometheus metrics: exactly the table of docs/architecture.md, updated from
fleet events and snapshots, and accepted by promtool."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram, generate_latest

from coordinator.metrics import FleetMetrics
from coordinator.observations import (
    AggregationTimed,
    DeviceGauges,
    FinetuneReported,
    FleetSnapshot,
    JobTransition,
    MessageRejected,
    MetricsReport,
    RolloutDecided,
    RolloutResult,
    RoundFinished,
    RoundResult,
    RunFinished,
)

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
ROW = re.compile(r"^\|\s*`(skipfleet_\w+)`\s*\|\s*(\w+)[^|]*\|([^|]*)\|$")


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (type, label names) from the metric names table."""
    table = {}
    for line in ARCHITECTURE.read_text().splitlines():
        match = ROW.match(line.strip())
        if match:
            name, kind, labels = match.groups()
            names = re.findall(r"`(\w+)`", labels)
            table[name] = (kind, tuple(names))
    return table


def defined(metrics: FleetMetrics) -> dict[str, tuple[str, tuple[str, ...]]]:
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            suffix = "_total" if value._type == "counter" else ""
            kind = {"counter": "counter", "gauge": "gauge", "histogram": "histogram"}[value._type]
            found[value._name + suffix] = (kind, tuple(value._labelnames))
    return found


def sample(metrics: FleetMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_metrics_are_exactly_the_documented_table():
    table = documented()
    assert len(table) == 26
    assert defined(FleetMetrics()) == table


def test_two_instances_do_not_collide():
    FleetMetrics()
    FleetMetrics()  # each has its own registry: no "Duplicated timeseries"


def test_events_move_counters_and_histograms():
    metrics = FleetMetrics()
    metrics.apply_events(
        [
            JobTransition("QUEUED"),
            JobTransition("QUEUED"),
            FinetuneReported("fan-abc", joules=2.5, seconds=3.0),
            FinetuneReported("fan-abc", joules=1.5, seconds=1.0),
            RoundFinished(RoundResult.COMPLETED, 42.0),
            AggregationTimed("exact-delta", 0.002),
            RolloutDecided(RolloutResult.ROLLED_BACK),
            MessageRejected("invalid_report"),
        ]
    )
    assert sample(metrics, "skipfleet_job_transitions_total", state="QUEUED") == 2
    assert sample(metrics, "skipfleet_energy_joules_total", cohort="fan-abc") == 4.0
    assert sample(metrics, "skipfleet_finetune_duration_seconds_count") == 2
    assert sample(metrics, "skipfleet_finetune_duration_seconds_sum") == 4.0
    assert sample(metrics, "skipfleet_rounds_total", outcome="completed") == 1
    assert sample(metrics, "skipfleet_round_duration_seconds_sum") == 42.0
    assert (
        sample(metrics, "skipfleet_aggregation_duration_seconds_count", algorithm="exact-delta")
        == 1
    )
    assert sample(metrics, "skipfleet_rollouts_total", outcome="rolled_back") == 1
    assert sample(metrics, "skipfleet_rejected_messages_total", reason="invalid_report") == 1


def test_snapshots_set_gauges_and_forget_what_is_gone():
    metrics = FleetMetrics()
    first = FleetSnapshot(
        devices=(
            DeviceGauges("pi-1", True, 0.6, 0.9, 1.5, 44.0, 2.7, 3),
            DeviceGauges("pi-2", False),
        ),
        jobs_by_state={"QUEUED": 2, "SUCCEEDED": 5},
        adapter_versions={"fan-abc": 3},
    )
    metrics.apply(MetricsReport((), first))
    assert sample(metrics, "skipfleet_devices_known") == 2
    assert sample(metrics, "skipfleet_devices_online") == 1
    assert sample(metrics, "skipfleet_device_accuracy_ratio", device="pi-1", stage="after") == 0.9
    assert sample(metrics, "skipfleet_device_power_watts", device="pi-1") == 1.5
    assert sample(metrics, "skipfleet_device_temperature_celsius", device="pi-1") == 44.0
    assert sample(metrics, "skipfleet_device_drift_score", device="pi-1") == 2.7
    assert sample(metrics, "skipfleet_device_adapter_version", device="pi-1") == 3
    assert math.isnan(sample(metrics, "skipfleet_device_power_watts", device="pi-2"))
    assert sample(metrics, "skipfleet_jobs", state="QUEUED") == 2
    assert sample(metrics, "skipfleet_adapter_version", cohort="fan-abc") == 3

    second = FleetSnapshot(devices=(DeviceGauges("pi-1", True),), jobs_by_state={"SUCCEEDED": 7})
    metrics.apply(MetricsReport((), second))
    assert sample(metrics, "skipfleet_device_power_watts", device="pi-2") is None
    assert sample(metrics, "skipfleet_jobs", state="QUEUED") == 0
    assert sample(metrics, "skipfleet_adapter_version", cohort="fan-abc") is None


def test_what_a_device_runs_is_one_series_that_moves_and_unknown_scores_are_absent():
    metrics = FleetMetrics()
    personal = DeviceGauges("pi-1", True, adapter_origin="personal", cluster="c1",
                            confidence_score=1.4, feature_score=0.7)  # fmt: skip
    metrics.apply(MetricsReport((), FleetSnapshot(devices=(personal, DeviceGauges("pi-2", True)))))
    info = "skipfleet_device_adapter_info"
    assert sample(metrics, info, device="pi-1", origin="personal", cluster="c1") == 1
    assert sample(metrics, info, device="pi-2", origin="base", cluster="none") == 1
    score = "skipfleet_device_label_free_score"
    assert sample(metrics, score, device="pi-1", signal="confidence") == 1.4
    assert sample(metrics, score, device="pi-2", signal="confidence") is None  # not NaN: absent
    fleet = DeviceGauges("pi-1", True, adapter_version=4, adapter_origin="fleet", cluster="c1")
    metrics.apply(MetricsReport((), FleetSnapshot(devices=(fleet,))))
    assert sample(metrics, info, device="pi-1", origin="personal", cluster="c1") is None
    assert sample(metrics, info, device="pi-1", origin="fleet", cluster="c1") == 1
    assert sample(metrics, info, device="pi-2", origin="base", cluster="none") is None  # gone
    metrics.apply(MetricsReport((RunFinished(3),), FleetSnapshot()))
    assert sample(metrics, "skipfleet_run_rounds_count") == 1
    assert sample(metrics, "skipfleet_run_rounds_sum") == 3


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
    metrics = FleetMetrics()
    metrics.apply_events([FinetuneReported("fan-abc", 1.0, 1.0), JobTransition("QUEUED")])
    metrics.apply_snapshot(FleetSnapshot((DeviceGauges("pi-1", True, 0.5, 0.8),), {"QUEUED": 1}))
    metrics.message_received("report", 100)
    checked = subprocess.run(
        [promtool, "check", "metrics"],
        input=generate_latest(metrics.registry),
        capture_output=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_metrics_are_served_over_http():
    metrics = FleetMetrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert b"skipfleet_devices_known" in response.read()
    finally:
        metrics.stop_serving()
