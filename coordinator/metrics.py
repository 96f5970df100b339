"""Every Prometheus metric of the coordinator, defined once (docs/architecture.md, "Prometheus
metrics"), on a CollectorRegistry of its own so tests and several coordinators in one process
never collide in the global default registry.

The driver process owns this object: the MQTT bridge counts messages here directly, and the fleet
state's events and snapshots (coordinator.observations, produced in the Ray actor) are applied
with apply().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from coordinator.observations import (
    AggregationTimed,
    DeviceGauges,
    DeviceQuarantined,
    FinetuneReported,
    FleetSnapshot,
    JobTransition,
    MessageRejected,
    MetricEvent,
    MetricsReport,
    RolloutDecided,
    RoundFinished,
    RunFinished,
)

# Fine-tunes on a Pi take seconds to minutes; rounds minutes; aggregation milliseconds.
FINETUNE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600)
AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30)
RUN_ROUND_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
LABEL_FREE_SIGNALS = ("confidence", "feature")


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "skipfleet_"
        self.devices_known = Gauge(p + "devices_known", "Devices the coordinator knows", registry=r)
        self.devices_online = Gauge(p + "devices_online", "Devices online now", registry=r)
        self.device_accuracy = Gauge(
            p + "device_accuracy_ratio",
            "Hold-out accuracy of the device's last fine-tune, before and after it",
            ["device", "stage"],
            registry=r,
        )
        self.device_power = Gauge(
            p + "device_power_watts", "Last reported power draw", ["device"], registry=r
        )
        self.device_temperature = Gauge(
            p + "device_temperature_celsius", "Last SoC temperature", ["device"], registry=r
        )
        self.device_drift = Gauge(
            p + "device_drift_score", "Last reported input drift score", ["device"], registry=r
        )
        self.device_clock_offset = Gauge(
            p + "device_clock_offset_seconds",
            "The device's clock minus the coordinator's, as the device estimates it",
            ["device"],
            registry=r,
        )
        self.device_adapter_version = Gauge(
            p + "device_adapter_version",
            "Fleet adapter version the device runs",
            ["device"],
            registry=r,
        )
        self.device_adapter = Gauge(
            p + "device_adapter_info",
            "1 for what the device runs (origin: base, personal or fleet) and its cluster",
            ["device", "origin", "cluster"],
            registry=r,
        )
        self.device_label_free = Gauge(
            p + "device_label_free_score",
            "Calibrated label-free drift score (1 = the base model's threshold)",
            ["device", "signal"],
            registry=r,
        )
        self.devices_quarantined = Gauge(
            p + "devices_quarantined",
            "Devices left alone after letting jobs time out in a row",
            registry=r,
        )
        self.quarantines = Counter(
            p + "quarantines", "Devices quarantined (jobs timed out in a row)", registry=r
        )
        self.run_rounds = Histogram(
            p + "run_rounds",
            "Rounds a federated run took",
            buckets=RUN_ROUND_BUCKETS,
            registry=r,
        )
        self.energy = Counter(
            p + "energy_joules", "Fine-tune energy reported by devices", ["cohort"], registry=r
        )
        self.finetune_duration = Histogram(
            p + "finetune_duration_seconds",
            "Device fine-tune wall time",
            buckets=FINETUNE_BUCKETS,
            registry=r,
        )
        self.jobs = Gauge(p + "jobs", "Jobs per life-cycle state", ["state"], registry=r)
        self.job_transitions = Counter(
            p + "job_transitions", "Jobs entering each state", ["state"], registry=r
        )
        self.rounds = Counter(p + "rounds", "Fine-tune rounds finished", ["outcome"], registry=r)
        self.round_duration = Histogram(
            p + "round_duration_seconds",
            "Round start to adapter stored (or failure)",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.aggregation_duration = Histogram(
            p + "aggregation_duration_seconds",
            "Time to aggregate one round",
            ["algorithm"],
            buckets=AGGREGATION_BUCKETS,
            registry=r,
        )
        self.adapter_version = Gauge(
            p + "adapter_version", "Current fleet adapter version", ["cohort"], registry=r
        )
        self.rollouts = Counter(p + "rollouts", "Adapter rollouts decided", ["outcome"], registry=r)
        self.received_messages = Counter(
            p + "received_messages", "MQTT messages received", ["kind"], registry=r
        )
        self.received_bytes = Counter(
            p + "received_bytes", "MQTT payload bytes received", ["kind"], registry=r
        )
        self.sent_messages = Counter(
            p + "sent_messages", "MQTT messages published", ["kind"], registry=r
        )
        self.rejected_messages = Counter(
            p + "rejected_messages", "Messages dropped, by reason", ["reason"], registry=r
        )
        self._device_labels: set[str] = set()
        self._running: dict[str, tuple[str, str]] = {}  # device -> (origin, cluster) exported
        self._state_labels: set[str] = set()
        self._cohort_labels: set[str] = set()

    # ---- the bridge, in this process

    def message_received(self, kind: str, size: int) -> None:
        self.received_messages.labels(kind=kind).inc()
        self.received_bytes.labels(kind=kind).inc(size)

    def message_sent(self, kind: str) -> None:
        self.sent_messages.labels(kind=kind).inc()

    def message_rejected(self, reason: str) -> None:
        self.rejected_messages.labels(reason=reason).inc()

    # ---- the fleet state, from the actor

    def apply(self, report: MetricsReport) -> None:
        self.apply_events(report.events)
        self.apply_snapshot(report.snapshot)

    def apply_events(self, events: Iterable[MetricEvent]) -> None:
        for event in events:
            match event:
                case JobTransition(state=state):
                    self.job_transitions.labels(state=state).inc()
                case FinetuneReported(cohort=cohort, joules=joules, seconds=seconds):
                    self.energy.labels(cohort=cohort).inc(joules)
                    self.finetune_duration.observe(seconds)
                case RoundFinished(result=result, seconds=seconds):
                    self.rounds.labels(outcome=result.value).inc()
                    self.round_duration.observe(seconds)
                case AggregationTimed(algorithm=algorithm, seconds=seconds):
                    self.aggregation_duration.labels(algorithm=algorithm).observe(seconds)
                case RolloutDecided(result=result):
                    self.rollouts.labels(outcome=result.value).inc()
                case MessageRejected(reason=reason):
                    self.message_rejected(reason)
                case RunFinished(rounds=rounds):
                    self.run_rounds.observe(rounds)
                case DeviceQuarantined():
                    self.quarantines.inc()
                case _:
                    raise TypeError(f"not a metric event: {event!r}")

    def apply_snapshot(self, snapshot: FleetSnapshot) -> None:
        self.devices_known.set(len(snapshot.devices))
        self.devices_online.set(snapshot.devices_online)
        self.devices_quarantined.set(snapshot.devices_quarantined)
        for device in snapshot.devices:
            self._set_device(device)
        self._forget(self._device_labels, {d.device_id for d in snapshot.devices}, "device")
        for state, count in snapshot.jobs_by_state.items():
            self.jobs.labels(state=state).set(count)
        for state in self._state_labels - set(snapshot.jobs_by_state):
            self.jobs.labels(state=state).set(0)  # a state nobody is in any more counts 0
        self._state_labels |= set(snapshot.jobs_by_state)
        for cohort, version in snapshot.adapter_versions.items():
            self.adapter_version.labels(cohort=cohort).set(version)
        self._forget(self._cohort_labels, set(snapshot.adapter_versions), "cohort")

    def serve(self, addr: str, port: int) -> int:
        """Serves /metrics on a daemon thread; returns the bound port (port 0: any free one)."""
        server, _ = start_http_server(port, addr, registry=self.registry)
        self._server = server
        return server.server_port

    def stop_serving(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    # ---- internals

    def _set_device(self, d: DeviceGauges) -> None:
        device = d.device_id
        _set(self.device_accuracy.labels(device=device, stage="before"), d.accuracy_before)
        _set(self.device_accuracy.labels(device=device, stage="after"), d.accuracy_after)
        _set(self.device_power.labels(device=device), d.power_w)
        _set(self.device_temperature.labels(device=device), d.temperature_c)
        _set(self.device_drift.labels(device=device), d.drift_score)
        _set(self.device_adapter_version.labels(device=device), d.adapter_version)
        _set(self.device_clock_offset.labels(device=device), d.clock_offset_s)
        running = (d.adapter_origin, d.cluster)
        before = self._running.get(device)
        if before is not None and before != running:  # one series: what it runs now
            _remove(self.device_adapter, device, *before)
        self._running[device] = running
        self.device_adapter.labels(device, *running).set(1)
        scores = (d.confidence_score, d.feature_score)
        for signal, score in zip(LABEL_FREE_SIGNALS, scores, strict=True):
            if score is not None:  # an agent without calibration sends none: no series
                self.device_label_free.labels(device=device, signal=signal).set(score)

    def _forget(self, known: set[str], current: set[str], label: str) -> None:
        """Removes the series of devices (or cohorts) that are gone, so they stop being scraped."""
        for gone in known - current:
            if label == "device":
                for stage in ("before", "after"):
                    _remove(self.device_accuracy, gone, stage)
                for gauge in (
                    self.device_power,
                    self.device_temperature,
                    self.device_drift,
                    self.device_adapter_version,
                    self.device_clock_offset,
                ):
                    _remove(gauge, gone)
                if (running := self._running.pop(gone, None)) is not None:
                    _remove(self.device_adapter, gone, *running)
                for signal in LABEL_FREE_SIGNALS:
                    _remove(self.device_label_free, gone, signal)
            else:
                _remove(self.adapter_version, gone)
        known.clear()
        known.update(current)


def _set(child: Gauge, value: float | None) -> None:
    # Unknown is NaN, not 0: a dashboard must not read "0 W" or "accuracy 0" for "no reading".
    child.set(float("nan") if value is None else float(value))


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)
