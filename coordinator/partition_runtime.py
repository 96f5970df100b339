"""Ray at the boundary of a partitioned coordinator (--partitions N > 1).

Each partition is one PartitionActor: a FleetService on its own state dir (its cohorts) and an
MqttBridge of its own, in the actor's process, so both run on the partition's node. The bridge
subscribes through the coordinator's MQTT 5 share group: the broker hands each device message
to one of the N ingests, which applies it (its device is in one of its cohorts) or forwards it
to the owner's actor (PartitionIngestPort), and acknowledges it to the broker once the owner
has committed it, as the single-partition bridge does. The bridge ticks its own service and
publishes its own outbox. The driver keeps no MQTT client: its PartitionedFleetPort answers
the API from every partition's view, merged (coordinator.partition_views).

Calls between partitions: an ingest forwards with one ray.get over its batch's owners; peer
ingests run in their own concurrency group, so a partition busy in a default-group call (its
close, an operator request) never waits on a peer that waits on it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import ray

from coordinator.bridge import FatalReason, MqttBridge
from coordinator.config import CoordinatorConfig
from coordinator.fleet import NotFound
from coordinator.heap import tune_gc
from coordinator.ingest import Received
from coordinator.observations import (
    EventLog,
    FleetSnapshot,
    MessageRejected,
    MetricsReport,
    RejectReason,
)
from coordinator.outbound import Outbound
from coordinator.partition_views import (
    DEVICE_VIEWS,
    MERGED_VIEWS,
    PartitionReport,
    merge_evaluating,
    merge_health,
    merge_reports,
    merge_started,
    merge_view,
)
from coordinator.partitions import (
    DeviceDirectory,
    Routed,
    devices_of,
    partition_config,
    partition_of,
)
from coordinator.ports import Committing, Unavailable, committed_now
from coordinator.ray_runtime import (
    ACTOR_TASK_RETRIES,
    FleetHandle,
    aggregator_for,
    release_actor,
    start_actor,
)
from coordinator.service import READ_VIEWS, FleetService
from shared.protocol import MessageKind

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 30.0  # a forwarded batch is committed by its owner within this


class RelayMetrics:
    """The bridge's metrics inside a partition actor: counted here, taken by the driver's
    /metrics every metrics interval (bounded like the fleet's EventLog if nobody takes them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the bridge's threads count, the health group takes
        self._received: dict[str, tuple[int, int]] = {}
        self._sent: Counter[str] = Counter()
        self.received_total: Counter[str] = Counter()  # since start, per kind (health())
        self._events = EventLog()
        self._snapshot = FleetSnapshot()

    def message_received(self, kind: str, size: int) -> None:
        with self._lock:
            count, total = self._received.get(kind, (0, 0))
            self._received[kind] = (count + 1, total + size)
            self.received_total[kind] += 1

    def message_sent(self, kind: str) -> None:
        with self._lock:
            self._sent[kind] += 1

    def message_rejected(self, reason: str) -> None:
        self._events.record(MessageRejected(reason))

    @property
    def refreshes_on_scrape(self) -> bool:
        return False  # the driver takes every interval's report, snapshot included

    def apply(self, report: MetricsReport) -> None:
        for event in report.events:
            self._events.record(event)
        if report.snapshot is not None:
            self._snapshot = report.snapshot

    def take(self) -> PartitionReport:
        with self._lock:
            received, self._received = self._received, {}
            sent, self._sent = dict(self._sent), Counter()
        report = MetricsReport(tuple(self._events.drain()), self._snapshot)
        return PartitionReport(report, received, sent)


class Peers:
    """The other partitions' actors, found by name when first needed (they start after us)."""

    def __init__(self, parent: CoordinatorConfig, me: int) -> None:
        self._names = [
            partition_config(parent, i).fleet_actor_name for i in range(parent.partitions)
        ]
        self._namespace = parent.ray_namespace
        self.me = me
        self._handles: dict[int, FleetHandle] = {}

    def get(self, index: int) -> FleetHandle:
        if index not in self._handles:
            try:
                self._handles[index] = ray.get_actor(self._names[index], namespace=self._namespace)
            except ValueError:
                raise Unavailable(f"partition {index} is not running (yet)") from None
        return self._handles[index]

    def others(self) -> list[int]:
        return [i for i in range(len(self._names)) if i != self.me]

    def wait(self, refs: Sequence[ray.ObjectRef[Any]]) -> list[Any]:
        try:
            answers: list[Any] = ray.get(list(refs), timeout=PEER_TIMEOUT_S)
            return answers
        except ray.exceptions.GetTimeoutError:
            raise Unavailable(f"a partition did not answer in {PEER_TIMEOUT_S:.0f} s") from None
        except ray.exceptions.RayError as err:  # dead, restarting, or closed while we forwarded
            raise Unavailable(f"a partition is unavailable: {err}") from None


def registered(service: FleetService, devices: Sequence[str]) -> list[str]:
    """Those of `devices` this partition has a cohort for (the directory's durable half)."""
    registry = service.fleet.registry
    return [d for d in devices if (r := registry.get(d)) is not None and r.cohort is not None]


class PartitionIngestPort:
    """The bridge's fleet port inside a partition: its batch split by owner, the local part
    committed here and the rest by the owners (one wait for all), before the bridge acks."""

    def __init__(
        self, service: FleetService, lock: threading.RLock, peers: Peers, relay: RelayMetrics
    ) -> None:
        self._service = service
        self._lock = lock
        self._peers = peers
        self._relay = relay
        self.directory = DeviceDirectory(peers.me, len(peers.others()) + 1)

    def ingest(self, batch: Sequence[Received]) -> None:
        routed = self.directory.route(batch)
        if routed.unplaced:
            self._place(routed)
        refs = [self._peers.get(p).ingest.remote(items) for p, items in routed.remote.items()]
        if routed.local:
            with self._lock:
                self._service.ingest(routed.local)
        self._peers.wait(refs)

    def submit_ingest(self, batch: Sequence[Received]) -> Committing:
        return committed_now(self.ingest, batch)

    def _place(self, routed: Routed) -> None:
        """Devices not placed yet: looked up in every partition's registry; a heartbeat of a
        device none has is dropped (counted), any other message is applied here, where it
        is refused as from an unknown device just as a single coordinator would."""
        devices = devices_of(routed.unplaced)
        others = self._peers.others()
        answers = self._peers.wait([self._peers.get(p).registered.remote(devices) for p in others])
        found = {d: p for p, owned in zip(others, answers, strict=True) for d in owned}
        found.update({d: self._peers.me for d in registered(self._service, devices)})
        for received in self.directory.place_unplaced(routed, found):
            if received.envelope.kind == MessageKind.HEARTBEAT:
                self._relay.message_rejected(RejectReason.UNPLACED.value)
            else:
                routed.local.append(received)

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        with self._lock:
            return self._service.tick(acknowledged)

    def reask_open_jobs(self) -> int:
        """This ingest's session was lost: its own partition's open jobs are asked again (each
        partition's bridge has its own session, and sends only its own partition's jobs)."""
        with self._lock:
            return self._service.reask_open_jobs()

    def metrics_report(self, snapshot: bool = True) -> MetricsReport:
        return self._service.metrics_report(snapshot)


# ray's type overloads for @ray.remote(...) lack concurrency_groups (as FleetActor's)
@ray.remote(concurrency_groups={"health": 1, "query": 2, "peers": 1}, max_restarts=-1)  # type: ignore[call-overload]
class PartitionActor:
    def __init__(self, parent: CoordinatorConfig, index: int) -> None:
        config = partition_config(parent, index)
        logging.basicConfig(
            level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        self._index = index
        tune_gc()
        self._lock = threading.RLock()  # the bridge's threads and the actor's calls
        self._service = FleetService(config, aggregator=aggregator_for(config))
        self._relay = RelayMetrics()
        self._fatal: tuple[str, str] | None = None
        self._port = PartitionIngestPort(
            self._service, self._lock, Peers(parent, index), self._relay
        )
        self._bridge = MqttBridge(config, self._port, self._relay, on_fatal=self._on_fatal)
        self._bridge.start()

    def _on_fatal(self, kind: FatalReason, reason: str) -> None:
        self._fatal = (kind.value, reason)

    @ray.method(concurrency_group="peers")
    def ingest(self, batch: list[Received]) -> int:
        with self._lock:
            return self._service.ingest(batch)

    @ray.method(concurrency_group="query")
    def registered(self, devices: list[str]) -> list[str]:
        return registered(self._service, devices)

    def request_finetune(
        self, devices: list[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        with self._lock:
            return self._service.request_finetune(devices=devices, cohort=cohort, all_=all_)

    def evaluate(
        self, devices: list[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        with self._lock:
            return self._service.evaluate(
                devices=devices, cohort=cohort, all_=all_, version=version
            )

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        with self._lock:
            return self._service.promote(cohort, version, force)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        with self._lock:
            return self._service.rollback(cohort, cluster)

    @ray.method(concurrency_group="query")
    def read(self, view: str, *args: Any) -> Any:
        if view not in READ_VIEWS:
            raise ValueError(f"no view {view!r}")
        return getattr(self._service, view)(*args)

    @ray.method(concurrency_group="query")
    def find(self, view: str, *args: Any) -> Any:
        """A view of one device or adapter; None where this partition does not have it."""
        try:
            return self.read(view, *args)
        except NotFound:
            return None

    @ray.method(concurrency_group="health")
    def health(self) -> dict[str, Any]:
        return {
            **self._service.health(),
            "partition": self._index,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "resources": ray.get_runtime_context().get_assigned_resources(),  # type: ignore[no-untyped-call]
            "mqtt_connected": self._bridge.connected,
            "received": dict(self._relay.received_total),  # by this ingest, whoever owns them
            "fatal": self._fatal,
        }

    @ray.method(concurrency_group="health")
    def metrics_report(self) -> PartitionReport:
        return self._relay.take()

    def close(self) -> None:
        """Stops the ingest (what it received is committed, not acknowledged: the broker
        delivers it again to the next coordinator), then closes the state DB."""
        self._bridge.stop()
        self._service.close()


def start_partitions(config: CoordinatorConfig) -> list[FleetHandle]:
    """Every partition's actor (none adopted from another coordinator; see start_actor)."""
    handles: list[FleetHandle] = []
    try:
        for index in range(config.partitions):
            create = _partition_factory(config, index)
            handles.append(start_actor(partition_config(config, index), create=create))
    except BaseException:
        release_partitions(handles, config)
        raise
    return handles


def release_partitions(handles: Sequence[FleetHandle], config: CoordinatorConfig) -> None:
    for index, handle in enumerate(handles):
        release_actor(handle, partition_config(config, index))


def _partition_factory(
    parent: CoordinatorConfig, index: int
) -> Callable[[CoordinatorConfig], FleetHandle]:
    def create(config: CoordinatorConfig) -> FleetHandle:
        # what @ray.remote made of PartitionActor: an ActorClass its types do not say (above)
        actor_class: Any = PartitionActor
        return actor_class.options(  # type: ignore[no-any-return]
            name=config.fleet_actor_name,
            namespace=config.ray_namespace,
            max_task_retries=ACTOR_TASK_RETRIES,
            num_cpus=0,  # it waits on MQTT and SQLite; the CPUs are for aggregation tasks
            **_placement(parent, index),
        ).remote(parent, index)

    return create


def _placement(parent: CoordinatorConfig, index: int) -> dict[str, Any]:
    """A partition's state dir is a path on its node: it must come back on the same node.
    A named resource pins it; on this machine's own Ray, the driver's node; on a joined
    cluster without resources, Ray spreads them (documented: pin them for restarts)."""
    if parent.partition_resources:
        return {"resources": {parent.partition_resources[index]: 0.001}}
    if not parent.joins_cluster:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}
    return {"scheduling_strategy": "SPREAD"}


class PartitionedFleetPort:
    """The driver's side of a partitioned fleet, for the API and /metrics: reads merged from
    every partition (one ray.get over all), requests about a cohort sent to its partition,
    requests about devices to the partitions that have them."""

    def __init__(self, handles: Sequence[FleetHandle], *, timeout_s: float = 30.0) -> None:
        self.handles = list(handles)
        self._timeout_s = timeout_s

    def read(self, view: str, *args: Any) -> Any:
        if view in MERGED_VIEWS:
            return merge_view(view, args, self._all("read", view, *args))
        if view in DEVICE_VIEWS:
            found = [v for v in self._all("find", view, *args) if v is not None]
            if not found:
                raise NotFound(f"unknown device {args[0]!r}")
            return found[0]
        if view == "adapter":
            return self._call(self._owner(args[0]).read, view, *args)
        raise ValueError(f"no view {view!r}")

    def health(self) -> dict[str, Any]:
        return merge_health(self.partition_healths())

    def partition_healths(self) -> list[dict[str, Any]]:
        healths: list[dict[str, Any]] = self._all("health")
        return healths

    def metrics_report(self) -> PartitionReport:
        return merge_reports(self._all("metrics_report"))

    def request_finetune(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool
    ) -> dict[str, Any]:
        if cohort is not None:
            return self._answer(self._owner(cohort).request_finetune, None, cohort, all_)
        if devices is None or all_:
            return merge_started(self._all("request_finetune", devices, cohort, all_))
        answers = self._by_owner("request_finetune", devices, cohort, all_)
        return merge_started(answers)

    def evaluate(
        self, devices: Sequence[str] | None, cohort: str | None, all_: bool, version: int | None
    ) -> dict[str, Any]:
        if cohort is not None:
            return self._answer(self._owner(cohort).evaluate, None, cohort, all_, version)
        if devices is None or all_:
            return merge_evaluating(self._all("evaluate", devices, cohort, all_, version))
        return merge_evaluating(self._by_owner("evaluate", devices, cohort, all_, version))

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        return self._answer(self._owner(cohort).promote, cohort, version, force)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        return self._answer(self._owner(cohort).rollback, cohort, cluster)

    # ---- internals

    def _owner(self, cohort: str) -> FleetHandle:
        return self.handles[partition_of(cohort, len(self.handles))]

    def _by_owner(self, method: str, devices: Sequence[str], *args: Any) -> list[Any]:
        """The request once per partition with the devices it has; devices none has go to
        partition 0, which refuses them as unknown (as a single coordinator would)."""
        owned: list[list[str]] = self._all("registered", list(devices))
        placed = {d for ds in owned for d in ds}
        owned[0] = [*owned[0], *(d for d in devices if d not in placed)]
        refs = [
            getattr(h, method).remote(ds, *args)
            for h, ds in zip(self.handles, owned, strict=True)
            if ds
        ]
        return self._get(refs)

    def _all(self, method: str, *args: Any) -> list[Any]:
        return self._get([getattr(h, method).remote(*args) for h in self.handles])

    def _answer(self, method: Any, *args: Any) -> dict[str, Any]:
        answer: dict[str, Any] = self._call(method, *args)
        return answer

    def _call(self, method: Any, *args: Any) -> Any:
        return self._get([method.remote(*args)])[0]

    def _get(self, refs: list[ray.ObjectRef[Any]]) -> list[Any]:
        try:
            answers: list[Any] = ray.get(refs, timeout=self._timeout_s)
            return answers
        except ray.exceptions.GetTimeoutError:
            raise Unavailable(f"a partition did not answer in {self._timeout_s:.0f} s") from None
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None  # the service's own error (FleetRequestError, ...)
        except ray.exceptions.RayActorError as err:
            raise Unavailable(f"a partition is unavailable: {err}") from None
