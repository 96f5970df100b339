"""What the fleet state tells the metrics: events since the last look, and a snapshot of now.

The fleet state lives in the Ray actor and the Prometheus registry in the driver process (one
process serves /metrics). The actor records events (counters, histograms) in an EventLog and
builds snapshots (gauges) on demand; the driver drains both in one call and applies them with
coordinator.metrics. Plain values only: they cross the Ray boundary by pickling.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.hot_rows import TransactionalNotes
from coordinator.jobs import JobState
from coordinator.state_db import StateDB
from shared.protocol import JobReason


class RoundResult(StrEnum):
    COMPLETED = "completed"  # aggregated into a stored adapter version
    FAILED = "failed"


class RolloutResult(StrEnum):
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


# Why a job failed, the `reason` label of skipfleet_job_failures_total: the device's
# machine-readable JobReason, or what the coordinator itself decided. Every value is exported
# from the start (at 0), so "failures by reason" reads 0 rather than "No data".
TIMED_OUT = "timed_out"  # the coordinator's deadline passed
REPORT_REFUSED = "report_refused"  # the device's report failed the coordinator's checks
UNSPECIFIED = "unspecified"  # the device said no reason code
JOB_FAILURE_REASONS = (*(r.value for r in JobReason), TIMED_OUT, REPORT_REFUSED, UNSPECIFIED)
_FAILED_STATES = frozenset({JobState.FAILED, JobState.REJECTED, JobState.TIMED_OUT})


class RejectReason(StrEnum):
    """Why the bridge (coordinator.bridge) dropped an inbound message (the `reason` label)."""

    BAD_TOPIC = "bad_topic"
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    WRONG_ROUTE = "wrong_route"
    REASSEMBLY = "reassembly"
    OVERLOAD = "overload"
    # a partitioned coordinator's heartbeat from a device no partition has seen a presence of
    # (its cohort, so its partition, is unknown; its next heartbeat comes after its presence)
    UNPLACED = "unplaced"


# Why the fleet state dropped a message (coordinator.fleet.Fleet.reject; a test holds the
# literals there to this list). These and RejectReason start at 0 on /metrics.
FLEET_REJECT_REASONS = (
    "duplicate", "internal_error", "invalid_report", "invalid_status", "not_owner",
    "stale_report", "stale_status", "unexpected_kind", "unexpected_report", "unknown_adapter",
    "unknown_device", "unknown_job",
)  # fmt: skip


def failure_reason(state: str, detail: str | None) -> str | None:
    """The `reason` label of a job entering `state` with `detail`; None if it did not fail."""
    if state not in _FAILED_STATES:
        return None
    if state == JobState.TIMED_OUT:
        return TIMED_OUT
    if detail and detail.startswith("report refused"):
        return REPORT_REFUSED
    code = (detail or "").split(":", 1)[0].strip()  # ingest writes "code: reason"
    return code if code in JOB_FAILURE_REASONS else UNSPECIFIED


@dataclass(frozen=True)
class JobTransition:
    state: str  # the coordinator's JobState value
    failure: str | None = None  # failure_reason(): set when the job failed


@dataclass(frozen=True)
class FinetuneReported:
    cohort: str
    joules: float
    seconds: float


@dataclass(frozen=True)
class RoundFinished:
    result: RoundResult
    seconds: float


@dataclass(frozen=True)
class AggregationTimed:
    algorithm: str
    seconds: float


@dataclass(frozen=True)
class RolloutDecided:
    result: RolloutResult


@dataclass(frozen=True)
class MessageRejected:
    reason: str


@dataclass(frozen=True)
class DeviceQuarantined:
    """A device let too many jobs time out in a row."""


@dataclass(frozen=True)
class RunFinished:
    """A federated run ended after this many rounds."""

    rounds: int


MetricEvent = (
    JobTransition
    | FinetuneReported
    | RoundFinished
    | AggregationTimed
    | RolloutDecided
    | MessageRejected
    | RunFinished
    | DeviceQuarantined
)


class EventLog:
    """Events waiting for the driver; bounded so a driver that stops reading costs no memory."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._capacity = capacity
        self._events: list[MetricEvent] = []
        self._lock = threading.Lock()  # the health group drains while the default group records
        self._notes: TransactionalNotes[MetricEvent] | None = None  # see follow()
        self.dropped = 0

    def follow(self, db: StateDB) -> None:
        """From now on an event recorded inside a transaction of `db` counts only if that
        commits: a message whose effects roll back (an ingest batch applied again message by
        message after one failed) is not counted twice."""
        self._notes = TransactionalNotes(db, commit=self._append)

    def record(self, event: MetricEvent) -> None:
        if self._notes is not None:
            self._notes.note(event)
        else:
            self._append([event])

    def _append(self, events: list[MetricEvent]) -> None:
        with self._lock:
            room = max(0, self._capacity - len(self._events))
            self._events.extend(events[:room])
            self.dropped += max(0, len(events) - room)

    def drain(self) -> list[MetricEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events


@dataclass(frozen=True)
class DeviceGauges:
    device_id: str
    online: bool
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    drift_score: float | None = None
    adapter_version: int | None = None
    adapter_origin: str = "base"  # base, personal or fleet
    cluster: str = "none"  # the cluster it is placed in ("none": in none)
    confidence_score: float | None = None  # calibrated: 1.0 = the base model's threshold
    feature_score: float | None = None
    # Latest accuracy of what it runs now, from an evaluation, an apply or a fine-tune.
    accuracy: float | None = None
    last_seen: float | None = None  # epoch seconds of its last heartbeat or presence news
    spooled: int | None = None  # messages its spool holds, as its last heartbeat said
    cohort: str = "none"  # the cohort it registered in ("none": not registered yet)
    clock_offset_s: float | None = None  # the device's clock minus the coordinator's


@dataclass(frozen=True)
class FleetSnapshot:
    devices: tuple[DeviceGauges, ...] = ()
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    adapter_versions: dict[str, int] = field(default_factory=dict)  # cohort -> current version
    devices_quarantined: int = 0
    # Per cohort: devices in it, and those not running their cluster's current fleet version.
    cohort_devices: dict[str, int] = field(default_factory=dict)
    devices_behind: dict[str, int] = field(default_factory=dict)

    @property
    def devices_online(self) -> int:
        return sum(1 for d in self.devices if d.online)


@dataclass(frozen=True)
class MetricsReport:
    events: tuple[MetricEvent, ...]
    snapshot: FleetSnapshot | None  # None: events only (the snapshot is made when scraped)
