"""How the driver's parts (MQTT bridge, HTTP API, metrics loop) reach the fleet state.

One interface, two implementations: RayFleetPort (coordinator.ray_runtime) talks to the actor;
LocalFleetPort calls a FleetService in this process (unit tests, tools). ingest() returns once
the batch is committed (the bridge acknowledges it to the broker then); submit_ingest() starts
the commit and hands back something to wait on; everything else returns a value (or raises
FleetRequestError / Unavailable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from coordinator.ingest import Received
from coordinator.observations import MetricsReport
from coordinator.outbound import Outbound
from coordinator.service import READ_VIEWS, FleetService


class Unavailable(RuntimeError):
    """The fleet state did not answer in time (actor restarting, overloaded): try again."""


class Committing(Protocol):
    """A batch handed to the fleet state (IngestPort.submit_ingest)."""

    def wait(self) -> None:
        """Returns once the batch is committed; Unavailable if that is not known."""
        ...


class Committed:
    """A batch committed before submit_ingest returned (a port in this process)."""

    def wait(self) -> None:
        return None


class NotCommitted:
    """A batch submit_ingest could not hand over: wait() raises why."""

    def __init__(self, error: Unavailable) -> None:
        self._error = error

    def wait(self) -> None:
        raise self._error


class OperatorPort(Protocol):
    """What the HTTP API asks of the fleet state: reads and operator requests (a partitioned
    coordinator's PartitionedFleetPort answers these from every partition)."""

    def request_finetune(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]: ...

    def evaluate(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]: ...

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        """force: also a version whose canary rolled back (Conflict otherwise)."""
        ...

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]: ...

    def read(self, view: str, *args: Any) -> Any:
        """One of coordinator.service.READ_VIEWS: devices | device_readings(since) | device(id) |
        device_adapters(id) | jobs(limit, device) | rounds(limit) | adapters | runs(limit) |
        clusters."""
        ...

    def health(self) -> dict[str, Any]: ...


class IngestPort(Protocol):
    """What the MQTT bridge asks of the fleet state."""

    def ingest(self, batch: Sequence[Received]) -> None:
        """Returns when the batch is committed; Unavailable if that is not known."""
        ...

    def submit_ingest(self, batch: Sequence[Received]) -> Committing:
        """Hands the batch over, returning at once where the port can (the actor's): the bridge
        keeps a second batch going while it waits for the first. Batches are committed in the
        order they were submitted."""
        ...

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        """acknowledged: outbox rows the broker acknowledged (see coordinator.outbox)."""
        ...

    def reask_open_jobs(self) -> int:
        """The bridge's session was lost: every open job's command again (coordinator.reask)."""
        ...

    def metrics_report(self, snapshot: bool = True) -> MetricsReport:
        """The metric events since the last report, and (snapshot) the fleet's gauges."""
        ...


class FleetPort(OperatorPort, IngestPort, Protocol):
    """The whole fleet state behind one port (one actor, or a FleetService in this process)."""


class LocalFleetPort:
    """A FleetService in this process; one lock stands in for the actor's one-at-a-time."""

    def __init__(self, service: FleetService) -> None:
        self.service = service
        self._lock = threading.RLock()

    def ingest(self, batch: Sequence[Received]) -> None:
        with self._lock:
            self.service.ingest(batch)

    def submit_ingest(self, batch: Sequence[Received]) -> Committing:
        return committed_now(self.ingest, batch)

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        with self._lock:
            return self.service.tick(acknowledged)

    def reask_open_jobs(self) -> int:
        with self._lock:
            return self.service.reask_open_jobs()

    def metrics_report(self, snapshot: bool = True) -> MetricsReport:
        with self._lock:
            return self.service.metrics_report(snapshot)

    def request_finetune(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        with self._lock:
            return self.service.request_finetune(devices=devices, cohort=cohort, all_=all_)

    def evaluate(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        with self._lock:
            return self.service.evaluate(devices=devices, cohort=cohort, all_=all_, version=version)

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        with self._lock:
            return self.service.promote(cohort, version, force)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self.service.rollback(cohort, cluster)

    def read(self, view: str, *args: Any) -> Any:
        if view not in READ_VIEWS:
            raise ValueError(f"no view {view!r}")
        with self._lock:
            return getattr(self.service, view)(*args)

    def health(self) -> dict[str, Any]:
        with self._lock:
            return self.service.health()


def committed_now(
    ingest: Callable[[Sequence[Received]], None], batch: Sequence[Received]
) -> Committing:
    """submit_ingest for a port that commits in the caller's thread: done before it returns."""
    try:
        ingest(batch)
    except Unavailable as err:
        return NotCommitted(err)
    return Committed()
