"""The fleet state: every plain class over one state dir, and the two side channels they share
(metric events for the driver, and the outbox of messages for the MQTT bridge).

Built by FleetService (inside the Ray actor, or in-process in tests); constructing it again over
the same state dir is how a restarted actor carries on: every table reloads from SQLite.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator.adapter_store import AdapterStore, AdapterStoreError
from coordinator.clock import Clock, boot_clock, system_clock
from coordinator.clusters import ClusterBook
from coordinator.commands import CommandLog
from coordinator.config import CoordinatorConfig
from coordinator.history import HistoryPruner
from coordinator.jobs import Job, JobTable
from coordinator.observations import EventLog, JobTransition, MessageRejected, failure_reason
from coordinator.outbound import DownlinkMessage, Outbound, publication
from coordinator.outbox import AdapterRef, DurableOutbox
from coordinator.reask import JobCommands
from coordinator.registry import DeviceRecord, FleetRegistry
from coordinator.reports import ReportStore
from coordinator.rollout import RolloutManager
from coordinator.round_records import RoundRecords
from coordinator.rounds import RoundTable
from coordinator.runs import RunBook
from coordinator.scheduler import FineTuneScheduler
from coordinator.seen import SeenMessages
from coordinator.state_db import StateDB
from shared.protocol import AdapterPublication, DesiredState
from shared.protocol import Job as JobCommand

log = logging.getLogger(__name__)


class FleetRequestError(ValueError):
    """An operator request that cannot be done as asked (the API answers 4xx with the message)."""

    status = 400


class NotFound(FleetRequestError):
    status = 404


class Conflict(FleetRequestError):
    status = 409


def task_name(agent_cohort: str) -> str:
    """The agent's --cohort as a registry task name ([a-z0-9][a-z0-9_-]{0,63}).

    The agent allows upper case and `.:+`; the registry's cohort id is `{task}-{base hash}`.
    """
    name = re.sub(r"[^a-z0-9_-]+", "-", agent_cohort.lower()).strip("-_")[:64]
    return name or "default"


@dataclass
class Fleet:
    config: CoordinatorConfig
    clock: Clock
    db: StateDB
    registry: FleetRegistry
    jobs: JobTable
    scheduler: FineTuneScheduler
    triggers: FineTuneScheduler
    rounds: RoundTable
    records: RoundRecords
    store: AdapterStore
    rollouts: RolloutManager
    commands: CommandLog
    reports: ReportStore
    clusters: ClusterBook
    runs: RunBook
    outbox: DurableOutbox
    seen: SeenMessages
    job_commands: JobCommands
    history: HistoryPruner
    events: EventLog = field(default_factory=EventLog)
    # device -> the last outbox row of its latest ask (its presence), while it may be waiting
    reasks: dict[str, tuple[int, str]] = field(default_factory=dict)

    @classmethod
    def open(cls, config: CoordinatorConfig, clock: Clock = system_clock) -> Fleet:
        db = StateDB.in_dir(config.state_dir)
        registry = FleetRegistry(db, clock=clock, energy_period_s=config.energy_period_s)
        jobs = JobTable(db, clock=clock)
        store = AdapterStore(db, config.state_dir, clock=clock)
        reports = ReportStore(db, config.state_dir)
        # Automatic triggers start rounds over a cohort (RoundPipeline), so the dispatching
        # scheduler must not also start lone fine-tunes for them: it runs with triggers off, and
        # a second one with the configured thresholds only answers automatic_trigger().
        dispatching = dataclasses.replace(
            config.policy,
            accuracy_threshold=None,
            accuracy_drop_margin=None,
            drift_threshold=None,
            label_free_threshold=None,
        )
        events = EventLog()
        events.follow(db)  # an event counts when the state change that made it commits
        return cls(
            events=events,
            config=config,
            clock=clock,
            db=db,
            registry=registry,
            jobs=jobs,
            scheduler=FineTuneScheduler(
                db,
                registry,
                jobs,
                policy=dispatching,
                clock=clock,
                # several ingests: a device's report and its job's end may arrive out of order
                reported=reports.devices_reported if config.partitioned else None,
            ),
            triggers=FineTuneScheduler(db, registry, jobs, policy=config.policy, clock=clock),
            rounds=RoundTable(db),
            records=RoundRecords(db),
            store=store,
            rollouts=RolloutManager(db, store, policy=config.rollout, clock=clock),
            commands=CommandLog(db),
            reports=reports,
            clusters=ClusterBook(db, max_distance=config.cluster_distance, clock=clock),
            runs=RunBook(db, config.federation),
            outbox=DurableOutbox(db, config.client_id, clock, publish_limit=config.chunk_limit),
            seen=SeenMessages(db, clock),
            job_commands=JobCommands(db, config.client_id, clock),
            # a clock other than the system's is a simulation's: steady by construction
            history=HistoryPruner(
                db,
                jobs,
                config.history_s,
                clock,
                steady=boot_clock if clock is system_clock else clock,
            ),
        )

    # ---- side channels

    def send(self, device_id: str, message: DownlinkMessage) -> None:
        """Into the durable outbox, in the caller's transaction (see coordinator.outbox); a
        job's command is also remembered, to be sent again (coordinator.reask)."""
        encoded = self.outbox.add(device_id, message)
        if isinstance(message, JobCommand | DesiredState):
            self.job_commands.remember(device_id, message, encoded)

    def reask(self, device_id: str | None = None) -> int:
        """Sends the commands of the open jobs of a device (None: of every device) again, in
        the caller's transaction; returns how many (coordinator.reask says when and why).
        A device's ask still waiting in the outbox, not handed out, is not queued again: it goes
        out after this presence anyway, and so does any job sent since (a later row). So a device
        flapping its presence gets at most one copy per hand-out, not one per presence."""
        if device_id is not None:
            last = self.reasks.pop(device_id, None)
            if last is not None and self.outbox.waiting(last):
                self.reasks[device_id] = last
                return 0
        asked = self.job_commands.of(self.jobs.active(device_id))
        for device, command in asked:
            if isinstance(command, DesiredState):
                self.send_desired(device, command)  # the pointer whose offer is the job
            else:
                self.outbox.add(device, command)
        newest = None if device_id is None or not asked else self.outbox.newest_of(device_id)
        if device_id is not None and newest is not None:
            self.reasks[device_id] = newest
        return len(asked)

    def send_adapter(self, device_id: str, cohort: str, version: int) -> None:
        """A stored adapter version, by reference (read from the store when handed out)."""
        self.outbox.add_adapter(device_id, AdapterRef(cohort, version, self.config.encoding.value))

    def adapter_waiting(self, device_id: str, cohort: str, version: int) -> bool:
        """That adapter is in the outbox for the device, not handed out yet."""
        ref = AdapterRef(cohort, version, self.config.encoding.value)
        return self.outbox.adapter_waiting(device_id, ref)

    def send_desired(self, device_id: str, pointer: DesiredState) -> None:
        """The retained pointer, with its version's adapter inline when small enough."""
        if pointer.adapter_version is None:
            self.send(device_id, pointer)
            return
        ref = AdapterRef(pointer.cohort, pointer.adapter_version, self.config.encoding.value)
        encoded = self.outbox.add_desired(device_id, pointer, ref)
        self.job_commands.remember(device_id, pointer, encoded)

    def hand_out(self) -> list[Outbound]:
        return self.outbox.hand_out(self._resolve_adapter)

    def _resolve_adapter(self, ref: AdapterRef) -> AdapterPublication | None:
        try:
            return publication(self.store.get(ref.cohort, ref.version), ref.encoding)
        except AdapterStoreError:
            return None
        except OSError as err:  # its file gone or unreadable: as gone as a damaged one; a raise
            # here would lose the rest of the hand-out for this actor's life (outbox.hand_out)
            log.error("adapter %s v%d cannot be read: %s", ref.cohort, ref.version, err)
            return None

    def transitioned(self, job: Job) -> None:
        state = job.state.value
        self.events.record(JobTransition(state, failure_reason(state, job.detail)))

    def reject(self, reason: str, detail: str) -> None:
        log.warning("rejected (%s): %s", reason, detail)
        self.events.record(MessageRejected(reason))

    # ---- helpers the handlers share

    def reachable(self, record: DeviceRecord | None) -> bool:
        return self.scheduler.unreachable_reason(record, self.clock()) is None

    def create_job(self, device_id: str, kind: str, trigger: str) -> Job:
        """A one-shot command job (evaluate, apply): no retry, its own short timeout."""
        job = self.jobs.create(
            device_id,
            timeout_s=self.config.command_timeout_s,
            max_attempts=1,
            trigger=trigger,
            kind=kind,
        )
        self.transitioned(job)
        return job

    def close(self) -> None:
        self.reports.close_files()  # a stop leaves the rounds' arrays on disk, like the rows
        self.db.close()


def select_devices(
    fleet: Fleet, *, devices: Sequence[str] | None, cohort: str | None, all_: bool
) -> list[str]:
    """An operator's choice of devices: exactly one of a list, a cohort, or all."""
    if sum((devices is not None, cohort is not None, all_)) != 1:
        raise FleetRequestError('give exactly one of "devices", "cohort" or "all": true')
    if cohort is not None:
        members = [r.device_id for r in fleet.registry.devices(cohort)]
        if not members:
            raise FleetRequestError(f"cohort {cohort!r} has no devices")
        return members
    if all_:
        return [r.device_id for r in fleet.registry.devices()]
    if not devices:
        raise FleetRequestError('"devices" must list at least one device id')
    return list(devices)
