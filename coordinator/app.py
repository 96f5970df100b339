"""The running coordinator: the fleet actor, the MQTT bridge, the HTTP API and /metrics, started
and stopped in order. Used by `skipfleet coordinator` and by the integration tests (in their own
process, on the session's Ray)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import ray

from coordinator.api import ApiServer, FleetApi
from coordinator.bridge import MqttBridge
from coordinator.config import CoordinatorConfig
from coordinator.metrics import FleetMetrics
from coordinator.ray_runtime import RayFleetPort, start_actor

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT_S = 60.0


class StartupError(RuntimeError):
    """A part could not start (the actor did not answer): fatal for the CLI."""


class PortUnavailable(StartupError):
    """The API or /metrics port cannot be bound (in use, not permitted)."""


class FatalSignal:
    """Set by a part that cannot go on (the broker refused our credentials); the CLI waits on it."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.event.set()


@dataclass
class Coordinator:
    config: CoordinatorConfig
    actor: ray.actor.ActorHandle
    port: RayFleetPort
    metrics: FleetMetrics
    bridge: MqttBridge
    api: ApiServer
    metrics_port: int
    fatal: FatalSignal

    @classmethod
    def start(cls, config: CoordinatorConfig) -> Coordinator:
        """Ray must be initialised. Starts the actor, /metrics, the API, then the bridge."""
        actor = start_actor(config)
        port = RayFleetPort(actor)
        try:
            ray.get(actor.health.remote(), timeout=ACTOR_START_TIMEOUT_S)
        except Exception as err:
            raise StartupError(f"the fleet actor did not start: {err}") from err
        metrics = FleetMetrics()
        try:
            metrics_port = metrics.serve(config.metrics_addr, config.metrics_port)
        except OSError as err:
            raise PortUnavailable(
                f"cannot serve /metrics on {config.metrics_addr}:{config.metrics_port}: {err}"
            ) from None
        fatal = FatalSignal()
        bridge = MqttBridge(config, port, metrics, on_fatal=fatal)
        try:
            api = ApiServer(
                FleetApi(port, bridge_connected=lambda: bridge.connected),
                config.api_addr,
                config.api_port,
            )
        except OSError as err:
            metrics.stop_serving()
            raise PortUnavailable(
                f"cannot serve the API on {config.api_addr}:{config.api_port}: {err}"
            ) from None
        coordinator = cls(config, actor, port, metrics, bridge, api, metrics_port, fatal)
        api.start()
        bridge.start()
        log.info("coordinator up: API on port %d, /metrics on port %d", api.port, metrics_port)
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
        ray.kill(self.actor, no_restart=True)
        log.info("coordinator stopped")
