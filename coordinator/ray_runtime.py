"""Ray at the boundary: the named fleet actor, aggregation as Ray tasks, and the driver's client.

The actor is a thin shell around FleetService. Its __init__ re-runs after a crash
(max_restarts=-1) and FleetService reloads everything from SQLite, so a restarted actor carries
on; calls that were in flight are retried (max_task_retries), and every handler is idempotent.
Health, metrics and reads run in their own concurrency groups so a slow tick never blocks them
(StateDB serialises the threads' SQLite access). The actor is pinned to the driver's node: the
state dir is a local path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.aggregate_task import (
    AggregationOutcome,
    AggregationRequest,
    StrategyRun,
    run_strategy,
)
from coordinator.aggregation import AdapterShape, FitFailure, FitResult
from coordinator.config import CoordinatorConfig
from coordinator.ingest import Received
from coordinator.observations import MetricsReport
from coordinator.outbound import Outbound
from coordinator.ports import Unavailable
from coordinator.service import READ_VIEWS, FleetService

log = logging.getLogger(__name__)

ACTOR_TASK_RETRIES = 3  # calls in flight when the actor died are re-run after its restart


def init_ray(config: CoordinatorConfig) -> None:
    """Starts a small local Ray, or joins a cluster (`auto` or an address)."""
    if config.joins_cluster:
        ray.init(address=config.ray_address, namespace=config.ray_namespace, log_to_driver=True)
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        namespace=config.ray_namespace,
    )


@ray.remote(num_cpus=1, max_retries=2)
def aggregate_remote(
    algorithm: str,
    shape: AdapterShape,
    results: Sequence[FitResult],
    failures: Sequence[FitFailure],
) -> StrategyRun:
    return run_strategy(algorithm, shape, results, failures)


class RayAggregator:
    """Submits each strategy of a round as a Ray task over one shared copy of the inputs."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[AggregationRequest, dict[str, ray.ObjectRef]]] = {}

    def submit(self, request: AggregationRequest, algorithms: Sequence[str]) -> None:
        results = ray.put(list(request.results))  # once, shared by every strategy's task
        failures = list(request.failures)
        refs = {a: aggregate_remote.remote(a, request.shape, results, failures) for a in algorithms}
        self._pending[request.key] = (request, refs)

    def collect(self) -> list[AggregationOutcome]:
        """Outcomes of the rounds whose tasks all finished; never waits for the others."""
        if not self._pending:
            return []
        refs = [ref for _, by_algorithm in self._pending.values() for ref in by_algorithm.values()]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0])
        finished = [
            key
            for key, (_, by_algorithm) in self._pending.items()
            if ready.issuperset(by_algorithm.values())
        ]
        batches = [self._pending.pop(key) for key in finished]
        runs = iter(_gather([(a, ref) for _, refs in batches for a, ref in refs.items()]))
        return [
            AggregationOutcome(request, tuple(next(runs) for _ in refs))
            for request, refs in batches
        ]

    def pending(self) -> set[str]:
        return set(self._pending)


def _gather(refs: list[tuple[str, ray.ObjectRef]]) -> list[StrategyRun]:
    """One ray.get for every finished task (they are ready: it does not wait)."""
    try:
        return ray.get([ref for _, ref in refs])
    except ray.exceptions.RayError as err:
        # Strategy errors come back as values; this is a task that crashed after its retries.
        log.error("aggregation tasks failed: %s", err)
        return [StrategyRun(algorithm, 0.0, error=f"task failed: {err}") for algorithm, _ in refs]


@ray.remote(concurrency_groups={"health": 1, "query": 2}, max_restarts=-1)
class FleetActor:
    def __init__(self, config: CoordinatorConfig) -> None:
        logging.basicConfig(
            level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self._service = FleetService(config, aggregator=RayAggregator())

    def ingest(self, batch: list[Received]) -> int:
        return self._service.ingest(batch)

    def tick(self) -> list[Outbound]:
        return self._service.tick()

    def request_finetune(
        self, devices: list[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        return self._service.request_finetune(devices=devices, cohort=cohort, all_=all_)

    def evaluate(
        self, devices: list[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        return self._service.evaluate(devices=devices, cohort=cohort, all_=all_, version=version)

    def promote(self, cohort: str, version: int) -> dict[str, Any]:
        return self._service.promote(cohort, version)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        return self._service.rollback(cohort, cluster)

    @ray.method(concurrency_group="query")
    def read(self, view: str, *args: Any) -> Any:
        if view not in READ_VIEWS:
            raise ValueError(f"no view {view!r}")
        return getattr(self._service, view)(*args)

    @ray.method(concurrency_group="health")
    def health(self) -> dict[str, Any]:
        return self._service.health()

    @ray.method(concurrency_group="health")
    def metrics_report(self) -> MetricsReport:
        return self._service.metrics_report()

    def close(self) -> None:
        """Closes the state DB (checkpointing its WAL) before the actor is killed."""
        self._service.close()


def start_actor(config: CoordinatorConfig) -> ray.actor.ActorHandle:
    """The named fleet actor: this cluster's existing one, or a new one on this node."""
    return FleetActor.options(
        name=config.actor_name,
        namespace=config.ray_namespace,
        get_if_exists=True,
        max_task_retries=ACTOR_TASK_RETRIES,
        num_cpus=0,  # it waits on SQLite and the driver; the CPUs are for aggregation tasks
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        ),
    ).remote(config)


class RayFleetPort:
    """The driver's side of the actor (see coordinator.ports.FleetPort).

    ingest() is fire-and-forget, ordered (one caller's calls to an actor run in order) and
    bounded: with too many batches in flight it waits for the oldest, on the bridge's worker
    thread, never on the MQTT network thread. Every other call is one ray.get with a timeout.
    """

    def __init__(
        self, actor: ray.actor.ActorHandle, *, timeout_s: float = 30.0, max_in_flight: int = 16
    ) -> None:
        self.actor = actor
        self._timeout_s = timeout_s
        self._max_in_flight = max_in_flight
        self._in_flight: list[ray.ObjectRef] = []
        self._lock = threading.Lock()

    def ingest(self, batch: Sequence[Received]) -> None:
        with self._lock:
            self._in_flight.append(self.actor.ingest.remote(list(batch)))
            excess = len(self._in_flight) - self._max_in_flight
            if excess > 0:
                self._settle(self._in_flight[:excess], self._timeout_s)
            self._settle(self._in_flight, 0)

    def flush(self, timeout_s: float) -> None:
        with self._lock:
            self._settle(self._in_flight, timeout_s)

    def tick(self) -> list[Outbound]:
        return self._call(self.actor.tick)

    def metrics_report(self) -> MetricsReport:
        return self._call(self.actor.metrics_report)

    def request_finetune(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        return self._call(
            self.actor.request_finetune, None if devices is None else list(devices), cohort, all_
        )

    def evaluate(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        devices = None if devices is None else list(devices)
        return self._call(self.actor.evaluate, devices, cohort, all_, version)

    def promote(self, cohort: str, version: int) -> dict[str, Any]:
        return self._call(self.actor.promote, cohort, version)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        return self._call(self.actor.rollback, cohort, cluster)

    def read(self, view: str, *args: Any) -> Any:
        return self._call(self.actor.read, view, *args)

    def health(self) -> dict[str, Any]:
        return self._call(self.actor.health)

    def _call(self, method, *args: Any) -> Any:
        try:
            return ray.get(method.remote(*args), timeout=self._timeout_s)
        except ray.exceptions.GetTimeoutError:
            waited = f"{self._timeout_s:.0f} s"
            raise Unavailable(f"the fleet actor did not answer in {waited}") from None
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None  # the service's own error (FleetRequestError, ...)
        except ray.exceptions.RayActorError as err:
            raise Unavailable(f"the fleet actor is unavailable: {err}") from None

    def _settle(self, refs: list[ray.ObjectRef], timeout_s: float) -> None:
        """Forgets finished ingest calls (waiting up to timeout_s); logs the failed ones."""
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if not done:
            return
        finished = set(done)
        self._in_flight = [ref for ref in self._in_flight if ref not in finished]
        try:
            ray.get(done)
        except ray.exceptions.RayError as err:
            # The service applies messages one by one and never raises; this is the actor dying
            # with these batches after their retries. Devices re-send nothing: log it loudly.
            log.error("a batch of device messages was lost: %s", err)
