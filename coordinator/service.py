"""FleetService: the whole fleet state behind one object, with no Ray and no MQTT in it.

The Ray actor (coordinator.ray_runtime.FleetActor) is a thin shell around it; tests and tools use
it directly. Three entry points move the state: ingest() (device messages from the bridge),
tick() (time: timeouts, round closing, dispatch, aggregation results, canary deadlines,
automatic triggers, catch-up) and the operator requests; every one returns or queues plain data.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from coordinator import views
from coordinator.aggregate_task import Aggregator, LocalAggregator
from coordinator.clock import Clock, system_clock
from coordinator.config import DAY_S, CoordinatorConfig
from coordinator.distribution import AdapterDistributor
from coordinator.fleet import Fleet, select_devices
from coordinator.ingest import MessageHandler, Received, superseded
from coordinator.jobs import Job
from coordinator.observations import DeviceQuarantined, MessageRejected, MetricsReport
from coordinator.outbound import Outbound, cancel_job, finetune_job
from coordinator.pipeline import RoundPipeline
from coordinator.round_arrays import StorageFailed
from coordinator.round_records import RoundStage
from coordinator.scheduler import SkipReason, TickResult
from coordinator.stuck import stuck_work
from shared.protocol import JobKind

log = logging.getLogger(__name__)

# Automatic triggers and the catch-up of lagging devices scan the whole fleet: not every tick.
SCAN_INTERVAL_S = 5.0
# The read-only views the API may ask for (FleetService methods of these names).
READ_VIEWS = frozenset(
    {
        "devices",
        "device_readings",
        "device",
        "device_adapters",
        "jobs",
        "rounds",
        "adapters",
        "adapter",
        "runs",
        "clusters",
    }
)


class FleetService:
    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        aggregator: Aggregator | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self.config = config
        self.fleet = Fleet.open(config, clock)
        self._distributor = AdapterDistributor(self.fleet)
        self._pipeline = RoundPipeline(
            self.fleet, aggregator or LocalAggregator(), self._distributor
        )
        self._handler = MessageHandler(self.fleet, self._distributor)
        self._last_scan = float("-inf")
        self._gauges = views.GaugesMemo()  # metrics_report's (the health group's one thread)
        self.started_at = clock()
        # Names this fleet state's record versions (device_readings): a restarted actor counts
        # them from 1 again, under a new name, so a sampler reads every device once more.
        self._readings_store = uuid.uuid4().hex[:12]
        self._pipeline.resume()
        log.info("fleet state loaded from %s", config.state_dir)

    # ---- the bridge

    def ingest(self, batch: Sequence[Received]) -> int:
        """Applies device messages in order, the batch in one transaction (so, when this
        returns, every message is applied and remembered, and the bridge may acknowledge them);
        a repeat of an applied message changes nothing; one bad message never stops the others.
        A job's IN_PROGRESS followed in the batch by its end is only remembered as seen
        (ingest.superseded). Returns how many were applied or folded (not repeats).

        The batch is applied without a savepoint per message (two statements each); if a
        message raises, the whole transaction rolls back (memory included: coordinator.hot_rows)
        and the batch is applied again with a savepoint per message, so the bad one is
        refused alone and the others are kept."""
        folded = superseded(batch)
        try:
            with self.fleet.db.transaction():
                return sum(self._apply_or_raise(r, i not in folded) for i, r in enumerate(batch))
        except _MessageFailed:
            pass  # rolled back; each message on its own now
        finally:
            self._distributor.forget_views()
        try:
            with self.fleet.db.transaction():
                return sum(self._apply(r, handle=i not in folded) for i, r in enumerate(batch))
        finally:
            self._distributor.forget_views()

    def _apply_or_raise(self, received: Received, handle: bool) -> bool:
        try:
            if not self.fleet.seen.first_time(received.envelope):
                self.fleet.events.record(MessageRejected("duplicate"))
                return False
            if handle:
                self._handler.handle(received)
            return True
        except StorageFailed:  # not this message's fault: the batch fails whole, unacknowledged
            raise
        except Exception as err:
            raise _MessageFailed from err

    def _apply(self, received: Received, *, handle: bool = True) -> bool:
        try:
            with self.fleet.db.transaction():  # a savepoint: this message's writes, or none
                return self._apply_or_raise(received, handle)
        except StorageFailed:
            raise
        except Exception as err:  # a bug must cost one message, not the actor
            cause = err.__cause__ if isinstance(err, _MessageFailed) else err
            log.error(
                "could not apply a %s from %s",
                received.envelope.kind,
                received.device_id,
                exc_info=cause,
            )
            self.fleet.reject("internal_error", f"{type(cause).__name__}: {cause}")
            return False

    def tick(self, acknowledged: Sequence[int] = ()) -> list[Outbound]:
        """One step of time, in one transaction; `acknowledged` are the outbox rows the broker
        has acknowledged since the last tick. Returns the messages to publish: the outbox rows
        this actor has not handed out yet (after a restart, every unacknowledged one)."""
        with self.fleet.db.transaction():
            self.fleet.outbox.mark_sent(acknowledged)
            self._step()
        return self.fleet.hand_out()

    def _step(self) -> None:
        f = self.fleet
        rounds_before = f.rounds.open_count()
        result = f.scheduler.tick()
        self._dispatch(result)
        for job in result.timed_out:
            self._distributor.on_job_finished(job, None)
            self._timed_out(job)
        self._pipeline.on_closed(result.closed_rounds)
        self._pipeline.collect()
        self._distributor.check_deadlines()
        self._pipeline.settle()
        now = f.clock()
        if now - self._last_scan >= SCAN_INTERVAL_S:
            self._last_scan = now
            self._pipeline.trigger_automatically()
            self._pipeline.release_ended()
            f.reports.sync_files()
            self._distributor.reconcile()
            f.seen.prune()
            f.job_commands.prune()
            self._prune_history()
        if f.rounds.open_count() > rounds_before - len(result.closed_rounds):
            # a run's next round started in this tick: its jobs go out now, not a tick later
            self._dispatch(f.scheduler.dispatch_now())

    def _prune_history(self) -> None:
        pruned = self.fleet.history.prune_if_due()
        if pruned is not None and pruned.total:
            days = self.config.history_s / DAY_S
            log.info("history older than %g days deleted: %s", days, pruned.as_text())

    def reask_open_jobs(self) -> int:
        """The bridge connected without a session: every open job's command goes out again
        (coordinator.reask); returns how many."""
        with self.fleet.db.transaction():
            return self.fleet.reask()

    # ---- operator requests (HTTP API)

    def request_finetune(
        self, *, devices: Sequence[str] | None = None, cohort: str | None = None, all_: bool = False
    ) -> dict[str, Any]:
        with self.fleet.db.transaction():
            started = self._pipeline.request(devices=devices, cohort=cohort, all_=all_)
        return started.as_dict()

    def evaluate(
        self,
        *,
        devices: Sequence[str] | None = None,
        cohort: str | None = None,
        all_: bool = False,
        version: int | None = None,
    ) -> dict[str, Any]:
        selected = select_devices(self.fleet, devices=devices, cohort=cohort, all_=all_)
        with self.fleet.db.transaction():
            return self._distributor.evaluate(selected, version)

    def promote(self, cohort: str, version: int, force: bool = False) -> dict[str, Any]:
        with self.fleet.db.transaction():
            return self._distributor.promote(cohort, version, force)

    def rollback(self, cohort: str, cluster: str | None = None) -> dict[str, Any]:
        with self.fleet.db.transaction():
            return self._distributor.rollback(cohort, cluster)

    # ---- reads

    def devices(self) -> list[dict[str, Any]]:
        return views.devices(self.fleet)

    def device(self, device_id: str) -> dict[str, Any]:
        return views.device(self.fleet, device_id)

    def device_adapters(self, device_id: str) -> list[dict[str, Any]]:
        return views.device_adapters(self.fleet, device_id)

    def jobs(self, limit: int = 100, device_id: str | None = None) -> list[dict[str, Any]]:
        return views.jobs(self.fleet, limit, device_id)

    def rounds(self, limit: int = 50) -> list[dict[str, Any]]:
        return views.rounds(self.fleet, limit)

    def device_readings(self, since: dict[str, int] | None = None) -> dict[str, Any]:
        return views.device_readings(self.fleet, self._readings_store, since)

    def adapters(self) -> list[dict[str, Any]]:
        return views.adapters(self.fleet)

    def adapter(self, cohort: str, version: int) -> dict[str, Any]:
        return views.adapter(self.fleet, cohort, version)

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return views.runs(self.fleet, limit)

    def clusters(self) -> list[dict[str, Any]]:
        return views.clusters(self.fleet)

    def health(self) -> dict[str, Any]:
        f = self.fleet
        devices, online = f.registry.counts()
        return {
            "status": "ok",  # the API answers 503 when "stuck" is not empty
            "pid": os.getpid(),
            "started_at": self.started_at,
            "devices": devices,
            "online": online,
            "active_jobs": f.jobs.active_count(),
            "open_rounds": len(f.records.in_stage(RoundStage.RUNNING)),
            "aggregating_rounds": len(f.records.in_stage(RoundStage.AGGREGATING)),
            "active_runs": f.runs.running_count(),
            "dropped_metric_events": f.events.dropped,
            "outbox_backlog": f.outbox.backlog(),
            "stuck": stuck_work(f),
        }

    def metrics_report(self, snapshot: bool = True) -> MetricsReport:
        """The metric events since the last report and (snapshot) the fleet's gauges now."""
        gauges = views.snapshot(self.fleet, self._gauges) if snapshot else None
        return MetricsReport(tuple(self.fleet.events.drain()), gauges)

    def close(self) -> None:
        self.fleet.close()

    # ---- internals

    def _dispatch(self, result: TickResult) -> None:
        f = self.fleet
        for job in (*result.dispatched, *result.timed_out, *result.canceled):
            f.transitioned(job)
        starts: dict[str | None, dict[str, int]] = {}  # per round: its devices' start versions
        for job in result.dispatched:
            record = f.registry.get(job.device_id)
            base_hash = record.base_model_hash if record else None
            if job.round_id not in starts:  # decoded once per round, not once per job
                found = None if job.round_id is None else f.runs.round_of(job.round_id)
                starts[job.round_id] = {} if found is None else found[2]
            start = starts[job.round_id].get(job.device_id)
            steps = None if start is None else self.config.federation.steps
            message = finetune_job(
                job, self.config.finetune, base_hash, start_version=start, steps=steps
            )
            f.send(job.device_id, message)
        for job in (*result.timed_out, *result.canceled):
            self._cancel_on_device(job)
        _log_skips(result.skipped.items())

    def _timed_out(self, job: Job) -> None:
        policy = self.config.policy
        quarantined = self.fleet.registry.record_timeout(
            job.device_id, at=self.fleet.clock(), limit=policy.quarantine_after,
            hold_s=policy.quarantine_s,
        )  # fmt: skip
        if quarantined:
            log.warning("%s let %d jobs time out in a row: quarantined for %.0f s",
                        job.device_id, policy.quarantine_after, policy.quarantine_s)  # fmt: skip
            self.fleet.events.record(DeviceQuarantined())

    def _cancel_on_device(self, job: Job) -> None:
        """Tells a reachable device to stop work nobody waits for any more (a dead one finds
        the job expired when it comes back)."""
        f = self.fleet
        record = f.registry.get(job.device_id)
        if job.kind == JobKind.CANCEL.value or record is None or not f.reachable(record):
            return
        cancel = f.create_job(job.device_id, JobKind.CANCEL.value, trigger="cancel")
        f.send(job.device_id, cancel_job(cancel, job.job_id, record.base_model_hash))


class _MessageFailed(Exception):
    """A message of an ingest batch raised while applied (its cause): the batch is applied
    again, message by message."""


def _log_skips(skipped: Iterable[tuple[str, SkipReason]]) -> None:
    for device, reason in skipped:
        log.debug("not fine-tuning %s now: %s", device, reason.value)
