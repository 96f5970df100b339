"""The running coordinator: the fleet actor, the MQTT bridge, the HTTP API and /metrics, started
and stopped in order. Used by `skipfleet coordinator` and by the integration tests (in their own
process, on the session's Ray).

Start: the state dir's lock (one coordinator per state dir), the API token, a fleet actor of its
own (never another coordinator's), /metrics, the API, the bridge. Stop: the reverse; the actor it
created is killed and its name released before stop() returns."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from coordinator.api import ApiServer, FleetApi
from coordinator.bridge import FatalReason, MqttBridge
from coordinator.config import CoordinatorConfig
from coordinator.dashboard import Dashboard, FleetHistory
from coordinator.instance import StateDirLock
from coordinator.metrics import FleetMetrics
from coordinator.ports import OperatorPort
from coordinator.ray_runtime import RayFleetPort, release_actor, start_actor
from shared.http_auth import RequestGuard, ensure_token_file

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 60.0
SCRAPE_REFRESH_TIMEOUT_S = 5.0  # a /metrics scrape waits this long for a fresh snapshot


class StartupError(RuntimeError):
    """A part could not start (the actor did not answer): fatal for the CLI."""


class PortUnavailable(StartupError):
    """The API or /metrics port cannot be bound (in use, not permitted)."""


class FatalSignal:
    """Set by a part that cannot go on (the broker refused our credentials, another client took
    our MQTT session over or keeps closing our connections on our account); the CLI waits on
    it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self.kind: FatalReason | None = None

    def __call__(self, kind: FatalReason, reason: str) -> None:
        if self.reason is None:
            self.kind, self.reason = kind, reason
        self.event.set()


@dataclass
class Coordinator:
    config: CoordinatorConfig
    actor: ray.actor.ActorHandle[Any]
    port: RayFleetPort
    metrics: FleetMetrics
    bridge: MqttBridge
    api: ApiServer
    metrics_port: int
    fatal: FatalSignal
    lock: StateDirLock

    @classmethod
    def start(cls, config: CoordinatorConfig) -> Coordinator:
        """Ray must be initialised. InstanceConflict if another coordinator runs this instance,
        TokenFileError if the API token file is unusable, StartupError if a part fails."""
        lock = StateDirLock.acquire(config.state_dir)
        actor = None
        try:
            guard = RequestGuard(ensure_token_file(config.token_path), _where(config))
            actor = start_actor(config)
            return cls._start_parts(config, actor, guard, lock)
        except BaseException:
            if actor is not None:
                release_actor(actor, config)
            lock.release()
            raise

    @classmethod
    def _start_parts(
        cls,
        config: CoordinatorConfig,
        actor: ray.actor.ActorHandle[Any],
        guard: RequestGuard,
        lock: StateDirLock,
    ) -> Coordinator:
        port = RayFleetPort(actor)
        try:
            ray.get(actor.health.remote(), timeout=ACTOR_START_TIMEOUT_S)
        except Exception as err:
            raise StartupError(f"the fleet actor did not start: {err}") from err
        metrics, metrics_port = serve_metrics(config)
        # Within a scrape's time (Prometheus waits 10 s by default); the actor answers metrics
        # in a thread of their own, not behind an ingest.
        scrapes = RayFleetPort(actor, timeout_s=SCRAPE_REFRESH_TIMEOUT_S)
        metrics.refresh_on_scrape(scrapes.metrics_report, config.metrics_interval_s)
        fatal = FatalSignal()
        bridge = MqttBridge(config, port, metrics, on_fatal=fatal)
        api = serve_api(
            config,
            fleet_api(config, port, connected=lambda: bridge.connected, on_change=bridge.wake),
            guard,
            metrics,
        )
        coordinator = cls(config, actor, port, metrics, bridge, api, metrics_port, fatal, lock)
        api.start()
        bridge.start()
        log.info(
            "coordinator %s up: API on %s:%d, /metrics on %s:%d; the API token (for POSTs, and "
            "for reads from other hosts) is in %s",
            config.instance_name,
            config.api_addr,
            api.port,
            config.metrics_addr,
            metrics_port,
            config.token_path,
        )
        return coordinator

    def stop(self) -> None:
        """Stops taking requests and messages, hands what arrived to the actor, ends it.

        Every call of the actor commits to SQLite; closing the DB only checkpoints its WAL.
        """
        self.api.stop()
        self.bridge.stop()
        self.metrics.stop_serving()
        try:
            ray.get(self.actor.close.remote(), timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.RayError as err:  # the state is committed either way
            log.warning("the fleet actor did not close cleanly: %s", err)
        release_actor(self.actor, self.config)  # ours: start_actor never adopts another's
        self.lock.release()
        log.info("coordinator stopped")


def _where(config: CoordinatorConfig) -> str:
    return f"in the file {config.token_path} on the coordinator's host"


def serve_metrics(config: CoordinatorConfig) -> tuple[FleetMetrics, int]:
    """/metrics served on its address; PortUnavailable if it cannot be."""
    metrics = FleetMetrics()
    try:
        return metrics, metrics.serve(config.metrics_addr, config.metrics_port)
    except OSError as err:
        raise PortUnavailable(
            f"cannot serve /metrics on {config.metrics_addr}:{config.metrics_port}: {err}"
        ) from None


def fleet_api(
    config: CoordinatorConfig,
    port: OperatorPort,
    *,
    connected: Callable[[], bool],
    on_change: Callable[[], None] = lambda: None,
) -> FleetApi:
    """The operator API over a fleet port, with the dashboard and its history: one coordinator
    or partitioned, `connected` saying whether its MQTT ingest is."""
    dashboard = Dashboard(port.read, FleetHistory(), config.fleet_events_file)
    return FleetApi(port, bridge_connected=connected, dashboard=dashboard, on_change=on_change)


def serve_api(
    config: CoordinatorConfig, api: FleetApi, guard: RequestGuard, metrics: FleetMetrics
) -> ApiServer:
    """The API's server bound (not started); PortUnavailable, with /metrics stopped, if it
    cannot be."""
    try:
        return ApiServer(api, config.api_addr, config.api_port, guard)
    except OSError as err:
        metrics.stop_serving()
        raise PortUnavailable(
            f"cannot serve the API on {config.api_addr}:{config.api_port}: {err}"
        ) from None
