"""Every Prometheus metric of the coordinator, defined once (docs/architecture.md, "Prometheus
metrics"), on a CollectorRegistry of its own so tests and several coordinators in one process
never collide in the global default registry.

The driver process owns this object: the MQTT bridge counts messages here directly, and the fleet
state's events and snapshots (coordinator.observations, produced in the Ray actor) are applied
with apply(). A snapshot (every device's gauges) costs the actor and the driver ~0.1 s at 10,000
devices: with refresh_on_scrape() it is made when /metrics is scraped (at most one every
max_age_s), not every metrics interval whether or not anyone reads it; the events still come
every interval.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    ProcessCollector,
)
from prometheus_client.registry import Collector

from coordinator.device_metrics import DeviceCollector
from coordinator.jobs import JobState
from coordinator.metrics_http import metrics_app, serve
from coordinator.observations import (
    FLEET_REJECT_REASONS,
    JOB_FAILURE_REASONS,
    AggregationTimed,
    DeviceQuarantined,
    FinetuneReported,
    FleetSnapshot,
    JobTransition,
    MessageRejected,
    MetricEvent,
    MetricsReport,
    RejectReason,
    RolloutDecided,
    RolloutResult,
    RoundFinished,
    RoundResult,
    RunFinished,
)

# Fine-tunes on a Pi take seconds to minutes; rounds minutes; aggregation milliseconds.
FINETUNE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600)
AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30)
RUN_ROUND_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 50)
REJECT_REASONS = (*(r.value for r in RejectReason), *FLEET_REJECT_REASONS)


log = logging.getLogger(__name__)


class RefreshingRegistry(CollectorRegistry):
    """A registry that runs `before_collect` (if set) before each collection: a scrape."""

    def __init__(self) -> None:
        super().__init__()
        self.before_collect: Callable[[], None] | None = None
        self._collectors: list[Collector] = []  # in the order registered
        self._views: list[tuple[CollectorRegistry, Collector]] = []  # made by without()

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self._collectors.append(collector)
        self._in_views(CollectorRegistry.register, collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self._collectors.remove(collector)
        self._in_views(CollectorRegistry.unregister, collector)

    def _in_views(
        self, change: Callable[[CollectorRegistry, Collector], None], it: Collector
    ) -> None:
        for view, left_out in self._views:
            if it is not left_out:
                change(view, it)

    def collect(self) -> Iterator[Metric]:
        if self.before_collect is not None:
            self.before_collect()
        yield from super().collect()

    def without(self, left_out: Collector) -> CollectorRegistry:
        """A registry of the same collectors (the same objects, so the same values) less
        `left_out`, and without before_collect; collectors registered here later, or
        unregistered, are there too."""
        view = CollectorRegistry()
        for collector in self._collectors:
            if collector is not left_out:
                view.register(collector)
        self._views.append((view, left_out))
        return view


class FleetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or RefreshingRegistry()
        self._refresh_lock = threading.Lock()
        self._refreshed_at = float("-inf")
        self._source: Callable[[], MetricsReport] | None = None
        self._max_age_s = 0.0
        r = self.registry
        p = "skipfleet_"
        ProcessCollector(registry=r)  # process_*: the coordinator's CPU, memory, files, start
        self.build_info = Gauge(
            p + "build_info", "1, labelled with the running build", ["version", "python"],
            registry=r,
        )  # fmt: skip
        self.build_info.labels(version=_version(), python=platform.python_version()).set(1)
        self.devices_known = Gauge(p + "devices_known", "Devices the coordinator knows", registry=r)
        self.devices_online = Gauge(p + "devices_online", "Devices online now", registry=r)
        # device_online, device_accuracy_ratio, ... : made from the snapshot when scraped
        self.devices = DeviceCollector(r)
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
        self.jobs = Gauge(
            p + "jobs",
            "Jobs held per life-cycle state (within --history-days)",
            ["state"],
            registry=r,
        )
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
        self.cohort_devices = Gauge(
            p + "cohort_devices", "Devices registered in the cohort", ["cohort"], registry=r
        )
        self.devices_behind = Gauge(
            p + "devices_behind",
            "Devices of the cohort not running their cluster's current fleet version "
            "(base, personal, an older version or none; 0 while the cohort has no version)",
            ["cohort"],
            registry=r,
        )
        self.job_failures = Counter(
            p + "job_failures",
            "Jobs that failed, were rejected or timed out, by reason",
            ["reason"],
            registry=r,
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
        # kind -> (messages, bytes) children
        self._received: dict[str, tuple[Counter, Counter]] = {}
        self._sent: dict[str, Counter] = {}  # kind -> the sent_messages child
        self._cohort_labels: set[str] = set()
        self._start_at_zero()

    def _start_at_zero(self) -> None:
        """Every label value known in advance exists from the start at 0: a query for failed
        rounds reads 0, not "No data", and increase() sees the first one."""
        for outcome in RoundResult:
            self.rounds.labels(outcome=outcome.value)
        for rollout in RolloutResult:
            self.rollouts.labels(outcome=rollout.value)
        for reason in REJECT_REASONS:
            self.rejected_messages.labels(reason=reason)
        for reason in JOB_FAILURE_REASONS:
            self.job_failures.labels(reason=reason)
        for state in JobState:
            self.job_transitions.labels(state=state.value)
            self.jobs.labels(state=state.value)

    # ---- the bridge, in this process

    def message_received(self, kind: str, size: int, count: int = 1) -> None:
        """count > 1: a partition's ingest reporting several (size: their bytes)."""
        # the labelled children are looked up once per kind, not once per message
        children = self._received.get(kind)
        if children is None:
            children = self._received[kind] = (
                self.received_messages.labels(kind=kind),
                self.received_bytes.labels(kind=kind),
            )
        children[0].inc(count)
        children[1].inc(size)

    def message_sent(self, kind: str, count: int = 1) -> None:
        child = self._sent.get(kind)
        if child is None:
            child = self._sent[kind] = self.sent_messages.labels(kind=kind)
        child.inc(count)

    def message_rejected(self, reason: str) -> None:
        self.rejected_messages.labels(reason=reason).inc()

    # ---- the fleet state, from the actor

    @property
    def refreshes_on_scrape(self) -> bool:
        """Snapshots are made when scraped: the bridge's reports carry the events only."""
        return self._source is not None

    def refresh_on_scrape(self, source: Callable[[], MetricsReport], max_age_s: float) -> None:
        """A scrape first applies source()'s report (events and snapshot) unless one was
        applied less than max_age_s ago; if source() fails the scrape shows the last one."""
        registry = self._own_registry("refresh_on_scrape")
        self._source, self._max_age_s = source, max_age_s
        registry.before_collect = self._refresh

    def _refresh(self) -> None:
        source = self._source
        if source is None:
            return
        with self._refresh_lock:  # concurrent scrapes: one report, the others wait for it
            if time.monotonic() - self._refreshed_at < self._max_age_s:
                return
            try:
                report = source()
            except Exception as err:  # the actor busy or restarting: the last values stand
                log.warning("/metrics shows the last fleet snapshot: %s", err)
                return
            self.apply(report)

    def apply(self, report: MetricsReport) -> None:
        self.apply_events(report.events)
        if report.snapshot is not None:
            self.apply_snapshot(report.snapshot)
            self._refreshed_at = time.monotonic()

    def apply_events(self, events: Iterable[MetricEvent]) -> None:
        for event in events:
            match event:
                case JobTransition(state=state, failure=failure):
                    self.job_transitions.labels(state=state).inc()
                    if failure is not None:
                        self.job_failures.labels(reason=failure).inc()
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
        self.devices.update(snapshot.devices)
        for state in JobState:  # a state nobody is in counts 0
            self.jobs.labels(state=state.value).set(snapshot.jobs_by_state.get(state.value, 0))
        for cohort, version in snapshot.adapter_versions.items():
            self.adapter_version.labels(cohort=cohort).set(version)
        for cohort, count in snapshot.cohort_devices.items():
            self.cohort_devices.labels(cohort=cohort).set(count)
            self.devices_behind.labels(cohort=cohort).set(snapshot.devices_behind.get(cohort, 0))
            self.energy.labels(cohort=cohort)  # from 0 before the cohort's first fine-tune
        cohorts = set(snapshot.adapter_versions) | set(snapshot.cohort_devices)
        self._forget_cohorts(cohorts)

    def serve(self, addr: str, port: int) -> int:
        """Serves /metrics on a daemon thread, the per-device series written apart
        (coordinator.metrics_http); returns the bound port (port 0: any free one)."""
        others = self._own_registry("serve").without(self.devices)
        app = metrics_app(self.registry, others, self.devices, self._refresh)
        self._server = serve(app, addr, port)
        return self._server.server_port

    def stop_serving(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    # ---- internals

    def _own_registry(self, needed_by: str) -> RefreshingRegistry:
        if not isinstance(self.registry, RefreshingRegistry):
            raise TypeError(f"{needed_by} needs the registry FleetMetrics made itself")
        return self.registry

    def _forget_cohorts(self, current: set[str]) -> None:
        """Removes the series of cohorts that are gone, so they stop being scraped."""
        for gone in self._cohort_labels - current:
            for gauge in (self.adapter_version, self.cohort_devices, self.devices_behind):
                _remove(gauge, gone)
        self._cohort_labels = set(current)


def _version() -> str:
    try:
        return metadata.version("skipfleet")
    except metadata.PackageNotFoundError:  # a source tree run without `pip install`
        return "unknown"


def _remove(gauge: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        gauge.remove(*labels)
