"""Ray at the boundary: the named fleet actor, aggregation as Ray tasks, and the driver's client.

The actor is a thin shell around FleetService. Each coordinator creates its own, under its
instance's name, and never adopts one it finds: a live actor of that name belongs to another
coordinator (start_actor refuses), and one that is still dying after ray.kill is waited out.
 Its __init__ re-runs after a crash
(max_restarts=-1) and FleetService reloads everything from SQLite, so a restarted actor carries
on; calls that were in flight are retried (max_task_retries), and every handler is idempotent.
Health, metrics and reads run in their own concurrency groups so a slow tick never blocks them
(StateDB serialises the threads' SQLite access). The actor is pinned to the driver's node: the
state dir is a local path.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coordinator.aggregate_task import (
    AggregationOutcome,
    AggregationRequest,
    Aggregator,
    LocalAggregator,
    StrategyRun,
    run_strategies,
)
from coordinator.aggregation import AdapterShape, FitFailure, FitResult
from coordinator.config import AggregationRunner, CoordinatorConfig
from coordinator.heap import HeapTrimmer, tune_gc
from coordinator.ingest import Received
from coordinator.instance import InstanceConflict
from coordinator.observations import MetricsReport
from coordinator.outbound import Outbound
from coordinator.ports import Committing, NotCommitted, Unavailable
from coordinator.service import READ_VIEWS, FleetService

log = logging.getLogger(__name__)

ACTOR_TASK_RETRIES = 3  # calls in flight when the actor died are re-run after its restart
NAME_WAIT_S = 30.0  # how long a dying actor of our name may keep it
PROBE_TIMEOUT_S = 5.0  # a live actor answers health() within this
# A FleetActor's handle: Ray types an actor's methods only for a class its overloads accept,
# and @ray.remote with concurrency_groups is not one of them (see FleetActor)
FleetHandle = ray.actor.ActorHandle[Any]
# The tick that submits a round's aggregation waits this long for it (a round of 1,000 reports
# aggregates in ~0.1 s): its result is stored in the same tick, not a tick interval later. The
# actor's other calls wait meanwhile, once a round, when every report is already in.
AGGREGATION_WAIT_S = 0.3


def pack(value: object) -> bytes:
    """The device messages and outbound messages between the driver and the actor, pickled by
    the standard pickler: Ray's cloudpickle calls back into Python for every object, and cost
    2-3x as much for a batch of decoded messages (their classes import on both sides)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


class ActorOwnedElsewhere(InstanceConflict):
    """A live fleet actor already has this coordinator's name: another coordinator runs it."""


# The local Ray's worker pool, lean (ray.init's _system_config, Ray's RAY_CONFIG names): no
# worker started ahead of a task (an idle one is ~45 MiB PSS before it has done anything), and
# at most one idle worker kept once tasks ran, warm for the next round's aggregation (one task
# a round: RayAggregator). The actor's own worker is not an idle one.
LOCAL_WORKER_POOL = {
    "prestart_worker_first_driver": False,
    "enable_worker_prestart": False,
    "num_workers_soft_limit": 1,
}
# Holds a round's reports once (10,000 fan reports: ~75 MB) and the ingest batches in flight.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024**2


def init_ray(config: CoordinatorConfig) -> None:
    """Starts a small local Ray, or joins a cluster (`auto` or an address).

    Ray 2.x starts its GCS, raylet, log monitor, autoscaler monitor, an API server (with
    include_dashboard=False: its usage-stats module alone), and the raylet's dashboard and
    runtime-env agents whatever ray.init is given; what it does let us choose is set here."""
    if config.joins_cluster:
        ray.init(address=config.ray_address, namespace=config.ray_namespace, log_to_driver=True)
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        namespace=config.ray_namespace,
        _system_config=LOCAL_WORKER_POOL,
    )


@ray.remote(num_cpus=1, max_retries=2)
def aggregate_remote(
    algorithms: Sequence[str],
    shape: AdapterShape,
    results: Sequence[FitResult],
    failures: Sequence[FitFailure],
) -> tuple[StrategyRun, ...]:
    return run_strategies(algorithms, shape, results, failures)


class RayAggregator:
    """Submits each round's strategies as one Ray task, its reports passed once.

    The reports go into Ray's object store as the task's argument (one copy, read in place by
    the worker); the actor keeps the request without them, so its own copy is freed as soon as
    the round is submitted. One task, not one per strategy: one worker reads the inputs once
    (three tasks held three workers of 50-60 MiB each, each with its own view of the reports).
    """

    def __init__(self) -> None:
        # round key -> (the request without its reports, its strategies, the task)
        self._pending: dict[
            str, tuple[AggregationRequest, tuple[str, ...], ray.ObjectRef[tuple[StrategyRun, ...]]]
        ] = {}
        self._submitted = False  # since the last collect

    def submit(self, request: AggregationRequest, algorithms: Sequence[str]) -> None:
        ref = aggregate_remote.remote(
            tuple(algorithms), request.shape, list(request.results), list(request.failures)
        )
        slim = dataclasses.replace(request, results=())
        self._pending[request.key] = (slim, tuple(algorithms), ref)
        self._submitted = True

    def collect(self) -> list[AggregationOutcome]:
        """Outcomes of the rounds whose tasks finished; waits (briefly) only for tasks
        submitted since the last collect."""
        if not self._pending:
            return []
        refs = [ref for _, _, ref in self._pending.values()]
        wait_s, self._submitted = (AGGREGATION_WAIT_S if self._submitted else 0), False
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=wait_s)[0])
        finished = [key for key, (_, _, ref) in self._pending.items() if ref in ready]
        batches = [self._pending.pop(key) for key in finished]
        runs = _gather([(algorithms, ref) for _, algorithms, ref in batches])
        return [
            AggregationOutcome(request, outcome)
            for (request, _, _), outcome in zip(batches, runs, strict=True)
        ]

    def pending(self) -> set[str]:
        return set(self._pending)


def _gather(
    tasks: list[tuple[tuple[str, ...], ray.ObjectRef[tuple[StrategyRun, ...]]]],
) -> list[tuple[StrategyRun, ...]]:
    """One ray.get for every finished task (they are ready: it does not wait)."""
    try:
        runs: list[tuple[StrategyRun, ...]] = ray.get([ref for _, ref in tasks])
        return runs
    except ray.exceptions.RayError as err:
        # Strategy errors come back as values; this is a task that crashed after its retries.
        log.error("aggregation tasks failed: %s", err)
        return [
            tuple(StrategyRun(a, 0.0, error=f"task failed: {err}") for a in algorithms)
            for algorithms, _ in tasks
        ]


def aggregator_for(config: CoordinatorConfig) -> Aggregator:
    """The runner --aggregate-in chose: inline in the actor, or a Ray task a round."""
    if config.aggregate_in is AggregationRunner.TASK:
        return RayAggregator()
    return LocalAggregator()


# ray's type overloads for @ray.remote(...) lack concurrency_groups, a documented actor option
@ray.remote(concurrency_groups={"health": 1, "query": 2}, max_restarts=-1)  # type: ignore[call-overload]
class FleetActor:
    def __init__(self, config: CoordinatorConfig) -> None:
        logging.basicConfig(
            level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        tune_gc()
        self._service = FleetService(config, aggregator=aggregator_for(config))
        self._heap = HeapTrimmer()

    def ingest_packed(self, packed: bytes) -> int:
        """ingest() of a batch the driver pickled itself (see pack)."""
        batch: list[Received] = pickle.loads(packed)
        return self._service.ingest(batch)

    def tick_packed(self, acknowledged: list[int]) -> bytes:
        """tick(), its messages pickled here (see pack)."""
        return pack(self._service.tick(acknowledged))

    def reask_open_jobs(self) -> int:
        return self._service.reask_open_jobs()

    def request_finetune(
        self, devices: list[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        return self._service.request_finetune(devices=devices, cohort=cohort, all_=all_)

    def evaluate(
        self, devices: list[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        return self._service.evaluate(devices=devices, cohort=cohort, all_=all_, version=version)

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        return self._service.promote(cohort, version, force)

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
    def metrics_report_packed(self, snapshot: bool = True) -> bytes:
        """The metrics report, pickled here (see pack); with the snapshot, a record per device."""
        packed = pack(self._service.metrics_report(snapshot))
        self._heap.maybe_trim()  # asked every few seconds: the last fleet-wide views are freed
        return packed

    def close(self) -> None:
        """Closes the state DB (checkpointing its WAL) before the actor is killed."""
        self._service.close()


def start_actor(
    config: CoordinatorConfig, create: Callable[[CoordinatorConfig], FleetHandle] | None = None
) -> FleetHandle:
    """A new named fleet actor on this node, owned by this driver (it dies with it); `create`
    makes another kind of actor under the same rules (a partition's).

    Ray's get_if_exists would hand back any actor of the name, a live one (another
    coordinator's) or one still dying from ray.kill (Ray issue 44083: get_actor can return a
    killed actor). Instead: a name held by an actor that answers is refused; one held by an actor
    that does not is waited out until Ray releases it.
    """
    name, namespace = config.fleet_actor_name, config.ray_namespace
    deadline = time.monotonic() + NAME_WAIT_S
    while True:
        holder = _named_actor(name, namespace)
        if holder is None:
            try:
                return (create or _create_actor)(config)
            except ray.exceptions.ActorAlreadyExistsError:
                continue  # created by someone else between the look-up and ours: look again
        if _answers(holder):
            raise ActorOwnedElsewhere(
                f"a fleet actor named {name!r} (Ray namespace {namespace!r}) is already running: "
                f"another coordinator with this instance or state dir owns it. Stop that one, or "
                f"give this one its own --instance and --state-dir"
            )
        if time.monotonic() > deadline:
            raise ActorOwnedElsewhere(
                f"the fleet actor named {name!r} neither answers nor goes away "
                f"after {NAME_WAIT_S:.0f} s"
            )
        time.sleep(0.2)


def release_actor(actor: FleetHandle, config: CoordinatorConfig) -> None:
    """Kills an actor this coordinator created and waits until Ray has released its name, so a
    coordinator started right after this one creates a fresh actor instead of finding this one."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + NAME_WAIT_S
    while _named_actor(config.fleet_actor_name, config.ray_namespace) is not None:
        if time.monotonic() > deadline:
            log.warning("Ray still lists the killed fleet actor %s", config.fleet_actor_name)
            return
        time.sleep(0.1)


def _named_actor(name: str, namespace: str) -> FleetHandle | None:
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # no actor of that name (or it is gone)
        return None


def _answers(actor: FleetHandle) -> bool:
    try:
        ray.get(actor.health.remote(), timeout=PROBE_TIMEOUT_S)
        return True
    except ray.exceptions.GetTimeoutError:
        return True  # alive but busy (restarting, a long tick): still someone else's
    except ray.exceptions.RayError:
        return False  # dead, or dying from a ray.kill


def _create_actor(config: CoordinatorConfig) -> FleetHandle:
    # what @ray.remote made of FleetActor: an ActorClass, which its types do not say (above)
    actor_class: Any = FleetActor
    handle: FleetHandle = actor_class.options(
        name=config.fleet_actor_name,
        namespace=config.ray_namespace,
        max_task_retries=ACTOR_TASK_RETRIES,
        num_cpus=0,  # it waits on SQLite and the driver; the CPUs are for aggregation tasks
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=False
        ),
    ).remote(config)
    return handle


class RayFleetPort:
    """The driver's side of the actor (see coordinator.ports.FleetPort): every call is one
    ray.get with a timeout. ingest() waits for the commit, so the bridge can acknowledge; the
    bridge's one worker thread calls it, never the MQTT network thread."""

    def __init__(self, actor: FleetHandle, *, timeout_s: float = 30.0) -> None:
        self.actor = actor
        self._timeout_s = timeout_s

    def ingest(self, batch: Sequence[Received]) -> None:
        self.submit_ingest(batch).wait()

    def submit_ingest(self, batch: Sequence[Received]) -> Committing:
        try:
            return _Pending(self, self.actor.ingest_packed.remote(pack(list(batch))))
        except ray.exceptions.RayActorError as err:
            return NotCommitted(Unavailable(f"the fleet actor is unavailable: {err}"))

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        outbound: list[Outbound] = pickle.loads(
            self._call(self.actor.tick_packed, list(acknowledged))
        )
        return outbound

    def reask_open_jobs(self) -> int:
        asked: int = self._call(self.actor.reask_open_jobs)
        return asked

    def metrics_report(self, snapshot: bool = True) -> MetricsReport:
        report: MetricsReport = pickle.loads(self._call(self.actor.metrics_report_packed, snapshot))
        return report

    def request_finetune(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        return self._answer(
            self.actor.request_finetune, None if devices is None else list(devices), cohort, all_
        )

    def evaluate(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        devices = None if devices is None else list(devices)
        return self._answer(self.actor.evaluate, devices, cohort, all_, version)

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        return self._answer(self.actor.promote, cohort, version, force)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        return self._answer(self.actor.rollback, cohort, cluster)

    def read(self, view: str, *args: Any) -> Any:
        return self._call(self.actor.read, view, *args)

    def health(self) -> dict[str, Any]:
        return self._answer(self.actor.health)

    def _answer(self, method: Any, *args: Any) -> dict[str, Any]:
        """_call for the actor methods that answer with a JSON-ready dict."""
        answer: dict[str, Any] = self._call(method, *args)
        return answer

    def _call(self, method: Any, *args: Any) -> Any:
        return self.result(method.remote(*args))

    def result(self, ref: ray.ObjectRef[Any]) -> Any:
        """The call's answer; the service's own errors raised as they are, Unavailable if the
        actor does not answer in time or is gone."""
        try:
            return ray.get(ref, timeout=self._timeout_s)
        except ray.exceptions.GetTimeoutError:
            waited = f"{self._timeout_s:.0f} s"
            raise Unavailable(f"the fleet actor did not answer in {waited}") from None
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None  # the service's own error (FleetRequestError, ...)
        except ray.exceptions.RayActorError as err:
            raise Unavailable(f"the fleet actor is unavailable: {err}") from None


class _Pending:
    """An ingest call on its way to the actor (RayFleetPort.submit_ingest)."""

    def __init__(self, port: RayFleetPort, ref: ray.ObjectRef[Any]) -> None:
        self._port = port
        self._ref = ref

    def wait(self) -> None:
        self._port.result(self._ref)
