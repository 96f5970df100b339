"""A running partitioned coordinator (--partitions N > 1): its partition actors (each with its
own MQTT ingest, coordinator.partition_runtime), the HTTP API and /metrics over all of them.

Start: the state dir's lock, the partition layout check, the API token, the partition actors
(none adopted from another coordinator), /metrics, the API, the monitor. Stop: the reverse;
each partition stops its ingest and closes its state before its actor is killed."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import ray

from coordinator.api import ApiServer
from coordinator.app import (
    ACTOR_START_TIMEOUT_S,
    FatalSignal,
    StartupError,
    fleet_api,
    serve_api,
    serve_metrics,
)
from coordinator.bridge import FatalReason
from coordinator.config import CoordinatorConfig
from coordinator.instance import StateDirLock
from coordinator.metrics import FleetMetrics
from coordinator.partition_runtime import (
    PartitionedFleetPort,
    release_partitions,
    start_partitions,
)
from coordinator.partition_views import PartitionReport
from coordinator.partitions import check_layout
from coordinator.ports import Unavailable
from coordinator.ray_runtime import FleetHandle
from shared.http_auth import RequestGuard, ensure_token_file

log = logging.getLogger(__name__)


def apply_report(metrics: FleetMetrics, report: PartitionReport) -> None:
    metrics.apply(report.report)
    for kind, (count, size) in report.received.items():
        metrics.message_received(kind, size, count)
    for kind, count in report.sent.items():
        metrics.message_sent(kind, count)


class PartitionMonitor:
    """A driver thread: every metrics interval, the partitions' metrics into /metrics, and
    their health: whether every ingest is connected, and whether one gave up (fatal)."""

    def __init__(
        self,
        port: PartitionedFleetPort,
        metrics: FleetMetrics,
        fatal: FatalSignal,
        interval_s: float,
    ) -> None:
        self._port = port
        self._metrics = metrics
        self._fatal = fatal
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.connected = False
        self._thread = threading.Thread(target=self._run, name="partition-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(10.0)

    def poll(self) -> None:
        healths = self._port.partition_healths()
        self.connected = all(h["mqtt_connected"] for h in healths)
        for h in healths:
            if h["fatal"] is not None:
                kind, reason = h["fatal"]
                self._fatal(FatalReason(kind), f"partition {h['partition']}: {reason}")
        apply_report(self._metrics, self._port.metrics_report())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.poll()
            except Unavailable as err:
                log.warning("partition metrics skipped: %s", err)
            except Exception:
                log.exception("partition metrics failed")


@dataclass
class PartitionedCoordinator:
    config: CoordinatorConfig
    handles: list[FleetHandle]
    port: PartitionedFleetPort
    metrics: FleetMetrics
    monitor: PartitionMonitor
    api: ApiServer
    metrics_port: int
    fatal: FatalSignal
    lock: StateDirLock

    @classmethod
    def start(cls, config: CoordinatorConfig) -> PartitionedCoordinator:
        """Ray must be initialised. InstanceConflict if another coordinator runs this instance
        (or the state dir has another partition count), TokenFileError, StartupError."""
        lock = StateDirLock.acquire(config.state_dir)
        handles: list[FleetHandle] = []
        try:
            check_layout(config)
            guard = RequestGuard(ensure_token_file(config.token_path), _where(config))
            handles = start_partitions(config)
            return cls._start_parts(config, handles, guard, lock)
        except BaseException:
            release_partitions(handles, config)
            lock.release()
            raise

    @classmethod
    def _start_parts(
        cls,
        config: CoordinatorConfig,
        handles: list[FleetHandle],
        guard: RequestGuard,
        lock: StateDirLock,
    ) -> PartitionedCoordinator:
        port = PartitionedFleetPort(handles)
        try:
            ray.get([h.health.remote() for h in handles], timeout=ACTOR_START_TIMEOUT_S)
        except Exception as err:
            raise StartupError(f"a partition actor did not start: {err}") from err
        metrics, metrics_port = serve_metrics(config)
        fatal = FatalSignal()
        monitor = PartitionMonitor(port, metrics, fatal, config.metrics_interval_s)
        api = serve_api(
            config,
            fleet_api(config, port, connected=lambda: monitor.connected),
            guard,
            metrics,
        )
        api.start()
        monitor.start()
        log.info(
            "coordinator %s up with %d partitions: API on %s:%d, /metrics on %s:%d",
            config.instance_name, config.partitions, config.api_addr, api.port,
            config.metrics_addr, metrics_port,
        )  # fmt: skip
        return cls(config, handles, port, metrics, monitor, api, metrics_port, fatal, lock)

    def stop(self) -> None:
        self.api.stop()
        self.monitor.stop()
        self.metrics.stop_serving()
        try:
            ray.get([h.close.remote() for h in self.handles], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.RayError as err:  # each partition's state is committed anyway
            log.warning("a partition did not close cleanly: %s", err)
        release_partitions(self.handles, self.config)
        self.lock.release()
        log.info("coordinator stopped")


def _where(config: CoordinatorConfig) -> str:
    return f"in the file {config.token_path} on the coordinator's host"
