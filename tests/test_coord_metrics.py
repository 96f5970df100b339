"""The coordinator's Prometheus metrics: exactly the table of docs/architecture.md, updated from
fleet events and snapshots, and accepted by promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram, generate_latest

from coordinator.metrics import REJECT_REASONS, FleetMetrics
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
    failure_reason,
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
    # the per-device gauges, made from the snapshot when scraped (coordinator.device_metrics)
    found |= {name: ("gauge", labels) for name, labels in metrics.devices.described().items()}
    return found


def sample(metrics: FleetMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_metrics_are_exactly_the_documented_table():
    table = documented()
    assert len(table) == 33
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
    # pi-2 reported nothing: no series (not NaN), so avg() over the fleet stays a number.
    for name in (
        "skipfleet_device_power_watts",
        "skipfleet_device_temperature_celsius",
        "skipfleet_device_adapter_version",
        "skipfleet_device_last_seen_timestamp_seconds",
    ):
        assert sample(metrics, name, device="pi-2") is None, name
    assert sample(metrics, "skipfleet_device_accuracy_ratio", device="pi-2", stage="before") is None
    assert sample(metrics, "skipfleet_device_online", device="pi-2") == 0
    assert sample(metrics, "skipfleet_device_online", device="pi-1") == 1
    assert sample(metrics, "skipfleet_jobs", state="QUEUED") == 2
    assert sample(metrics, "skipfleet_adapter_version", cohort="fan-abc") == 3

    second = FleetSnapshot(devices=(DeviceGauges("pi-1", True),), jobs_by_state={"SUCCEEDED": 7})
    metrics.apply(MetricsReport((), second))
    assert sample(metrics, "skipfleet_device_power_watts", device="pi-2") is None
    assert sample(metrics, "skipfleet_jobs", state="QUEUED") == 0
    assert sample(metrics, "skipfleet_adapter_version", cohort="fan-abc") is None


class Reports:
    """A metrics source that counts its calls; each report has one more device than the last."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> MetricsReport:
        if self.fail:
            raise TimeoutError("the fleet actor did not answer in 5 s")
        self.calls += 1
        devices = tuple(DeviceGauges(f"pi-{n}", True) for n in range(self.calls))
        return MetricsReport((JobTransition("QUEUED", None),), FleetSnapshot(devices=devices))


def test_a_scrape_makes_the_snapshot_it_shows_at_most_once_per_max_age(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("coordinator.metrics.time.monotonic", lambda: now[0])
    metrics, source = FleetMetrics(), Reports()
    metrics.refresh_on_scrape(source, max_age_s=2.0)
    assert metrics.refreshes_on_scrape and source.calls == 0  # nothing made before a scrape
    generate_latest(metrics.registry)
    assert source.calls == 1 and sample(metrics, "skipfleet_devices_known") == 1
    now[0] += 1.9
    generate_latest(metrics.registry)  # younger than max_age_s: the same snapshot
    assert source.calls == 1 and sample(metrics, "skipfleet_devices_known") == 1
    now[0] += 0.2
    text = generate_latest(metrics.registry).decode()
    assert source.calls == 2 and 'skipfleet_device_online{device="pi-1"} 1.0' in text
    assert sample(metrics, "skipfleet_job_transitions_total", state="QUEUED") == 2  # events too


def test_a_scrape_whose_snapshot_fails_shows_the_last_one(monkeypatch, caplog):
    now = [100.0]
    monkeypatch.setattr("coordinator.metrics.time.monotonic", lambda: now[0])
    metrics, source = FleetMetrics(), Reports()
    metrics.refresh_on_scrape(source, max_age_s=2.0)
    generate_latest(metrics.registry)
    source.fail, now[0] = True, now[0] + 5.0
    generate_latest(metrics.registry)
    assert sample(metrics, "skipfleet_devices_known") == 1
    assert "shows the last fleet snapshot" in caplog.text
    source.fail = False
    generate_latest(metrics.registry)  # the next scrape tries again
    assert source.calls == 2 and sample(metrics, "skipfleet_devices_known") == 2


def test_a_report_without_a_snapshot_moves_counters_and_leaves_the_gauges():
    metrics = FleetMetrics()
    metrics.apply(MetricsReport((), FleetSnapshot(devices=(DeviceGauges("pi-1", True),))))
    metrics.apply(MetricsReport((JobTransition("QUEUED", None),), None))
    assert sample(metrics, "skipfleet_devices_known") == 1
    assert sample(metrics, "skipfleet_job_transitions_total", state="QUEUED") == 1


def test_what_a_device_runs_is_one_series_that_moves_and_unknown_scores_are_absent():
    metrics = FleetMetrics()
    personal = DeviceGauges("pi-1", True, adapter_origin="personal", cluster="c1",
                            confidence_score=1.4, feature_score=0.7)  # fmt: skip
    metrics.apply(MetricsReport((), FleetSnapshot(devices=(personal, DeviceGauges("pi-2", True)))))
    info = "skipfleet_device_adapter_info"
    assert sample(metrics, info, device="pi-1", cohort="none", origin="personal", cluster="c1") == 1
    assert sample(metrics, info, device="pi-2", cohort="none", origin="base", cluster="none") == 1
    score = "skipfleet_device_label_free_score"
    assert sample(metrics, score, device="pi-1", signal="confidence") == 1.4
    assert sample(metrics, score, device="pi-2", signal="confidence") is None  # not NaN: absent
    fleet = DeviceGauges("pi-1", True, adapter_version=4, adapter_origin="fleet", cluster="c1")
    metrics.apply(MetricsReport((), FleetSnapshot(devices=(fleet,))))
    assert (
        sample(metrics, info, device="pi-1", cohort="none", origin="personal", cluster="c1") is None
    )
    assert sample(metrics, info, device="pi-1", cohort="none", origin="fleet", cluster="c1") == 1
    assert (
        sample(metrics, info, device="pi-2", cohort="none", origin="base", cluster="none") is None
    )
    metrics.apply(MetricsReport((RunFinished(3),), FleetSnapshot()))
    assert sample(metrics, "skipfleet_run_rounds_count") == 1
    assert sample(metrics, "skipfleet_run_rounds_sum") == 3


def test_counters_with_known_labels_start_at_zero():
    metrics = FleetMetrics()
    for name, label, value in [
        ("skipfleet_rounds_total", "outcome", "failed"),
        ("skipfleet_rounds_total", "outcome", "completed"),
        ("skipfleet_rollouts_total", "outcome", "rolled_back"),
        ("skipfleet_rejected_messages_total", "reason", "malformed"),  # the bridge's
        ("skipfleet_rejected_messages_total", "reason", "unknown_job"),  # the fleet state's
        ("skipfleet_job_failures_total", "reason", "timed_out"),
        ("skipfleet_job_failures_total", "reason", "insufficient_data"),  # a device's JobReason
        ("skipfleet_job_transitions_total", "state", "FAILED"),
        ("skipfleet_jobs", "state", "IN_PROGRESS"),
    ]:
        assert sample(metrics, name, **{label: value}) == 0, (name, value)


def test_the_fleet_state_rejects_only_reasons_exported_from_the_start():
    # Fleet.reject("...") literals across the coordinator: each must be a pre-set label value.
    source = "\n".join(
        p.read_text() for p in (ARCHITECTURE.parent.parent / "coordinator").glob("*.py")
    )
    used = set(re.findall(r'(?:\.reject|MessageRejected)\(\s*"(\w+)"', source))
    assert len(used) >= 10, used  # the pattern still finds them
    assert used <= set(REJECT_REASONS), used - set(REJECT_REASONS)


def test_job_failures_are_counted_by_reason():
    metrics = FleetMetrics()
    metrics.apply_events([
        JobTransition("FAILED", failure_reason("FAILED", "insufficient_data: 3 rows")),
        JobTransition("TIMED_OUT", failure_reason("TIMED_OUT", "no result by the deadline")),
        JobTransition("FAILED", failure_reason("FAILED", "report refused: not finite")),
        JobTransition("REJECTED", failure_reason("REJECTED", "something odd")),
        JobTransition("SUCCEEDED", failure_reason("SUCCEEDED", None)),
    ])  # fmt: skip
    failures = {
        reason: sample(metrics, "skipfleet_job_failures_total", reason=reason)
        for reason in ("insufficient_data", "timed_out", "report_refused", "unspecified", "busy")
    }
    assert failures == {"insufficient_data": 1, "timed_out": 1, "report_refused": 1,
                        "unspecified": 1, "busy": 0}  # fmt: skip


def test_fleet_accuracy_and_devices_behind_are_exported_per_cohort():
    metrics = FleetMetrics()
    measured = DeviceGauges("pi-1", True, accuracy=0.8, cohort="fan-a", accuracy_after=0.82)
    never = DeviceGauges("pi-2", True, cohort="fan-a")  # never fine-tuned nor evaluated
    snapshot = FleetSnapshot(
        devices=(measured, never),
        adapter_versions={"fan-a": 2},
        cohort_devices={"fan-a": 2, "har-b": 5},
        devices_behind={"fan-a": 1, "har-b": 0},
    )
    metrics.apply(MetricsReport((), snapshot))
    accuracy = "skipfleet_device_accuracy_ratio"
    assert sample(metrics, accuracy, device="pi-1", stage="running") == 0.8
    assert sample(metrics, accuracy, device="pi-2", stage="running") is None
    assert sample(metrics, "skipfleet_devices_behind", cohort="fan-a") == 1
    assert sample(metrics, "skipfleet_devices_behind", cohort="har-b") == 0  # 0, not absent
    assert sample(metrics, "skipfleet_cohort_devices", cohort="har-b") == 5
    assert sample(metrics, "skipfleet_energy_joules_total", cohort="har-b") == 0
    metrics.apply(MetricsReport((), FleetSnapshot(cohort_devices={"fan-a": 0})))
    assert sample(metrics, "skipfleet_devices_behind", cohort="har-b") is None  # gone


def test_process_and_build_info_metrics_are_exported():
    metrics = FleetMetrics()
    assert sample(metrics, "process_start_time_seconds") > 0
    (family,) = [f for f in metrics.registry.collect() if f.name == "skipfleet_build_info"]
    (build,) = family.samples
    assert build.value == 1 and build.labels["version"] and build.labels["python"]


def test_promtool_accepts_the_exposition():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
    metrics = FleetMetrics()
    metrics.apply_events([FinetuneReported("fan-abc", 1.0, 1.0), JobTransition("QUEUED")])
    metrics.apply_snapshot(FleetSnapshot((DeviceGauges("pi-1", True, 0.5, 0.8),), {"QUEUED": 1}))
    metrics.message_received("report", 100)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
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
