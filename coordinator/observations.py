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


class RoundResult(StrEnum):
    COMPLETED = "completed"  # aggregated into a stored adapter version
    FAILED = "failed"


class RolloutResult(StrEnum):
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class JobTransition:
    state: str  # the coordinator's JobState value


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
        self.dropped = 0

    def record(self, event: MetricEvent) -> None:
        with self._lock:
            if len(self._events) >= self._capacity:
                self.dropped += 1
                return
            self._events.append(event)

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
    clock_offset_s: float | None = None  # the device's clock minus the coordinator's


@dataclass(frozen=True)
class FleetSnapshot:
    devices: tuple[DeviceGauges, ...] = ()
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    adapter_versions: dict[str, int] = field(default_factory=dict)  # cohort -> current version
    devices_quarantined: int = 0

    @property
    def devices_online(self) -> int:
        return sum(1 for d in self.devices if d.online)


@dataclass(frozen=True)
class MetricsReport:
    events: tuple[MetricEvent, ...]
    snapshot: FleetSnapshot
