"""Wiring: builds the agent's parts from an AgentConfig, starts them, and stops them in order.

Fatal problems (base model, data, state dir) surface while building, before any network
traffic, as FatalError subclasses the CLI turns into exit codes. A broker refusing our
credentials is fatal too, but is only known after connecting: it ends `run()` with its code.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from agent.adapter_inbox import AdapterInbox
from agent.adapter_store import AdapterStore
from agent.choice import OwnChoice
from agent.clock_offset import ClockOffset
from agent.config import AgentConfig
from agent.declined import DeclinedVersions
from agent.downlink import Downlink
from agent.drift import WINDOW_ROWS, RecentInputs
from agent.errors import ExitCode, FatalError
from agent.handlers import JobHandlers
from agent.health import HealthFile
from agent.job_history import JobHistory
from agent.jobs import JobRunner
from agent.kept_results import KeptResults
from agent.local_data import LocalData
from agent.meters import EnergyMeter
from agent.outbox import Outbox
from agent.reconcile import FetchPolicy, Reconciler
from agent.repeats import RepeatedJobs
from agent.simulation import DriftTrigger, SensorStream
from agent.spool import Spool
from agent.startup import (
    PresenceFactory,
    detect_meter,
    load_data,
    open_spool,
    prepare_state_dir,
    status_sender,
)
from agent.telemetry import HeartbeatLoop, Telemetry, TelemetrySources
from agent.transport import Transport
from agent.uplink import Uplink, new_boot_id
from shared.mqtt import Will
from shared.protocol.enums import PresenceState
from shared.topics import Topics

log = logging.getLogger(__name__)

SHUTDOWN_FLUSH_SECONDS = 3.0  # time given to deliver the last statuses before disconnecting


@dataclass
class Parts:
    """The agent's components, for wiring and for tests that look inside."""

    data: LocalData
    spool: Spool
    store: AdapterStore
    meter: EnergyMeter
    uplink: Uplink
    outbox: Outbox
    runner: JobRunner
    reconciler: Reconciler
    downlink: Downlink
    telemetry: Telemetry
    stream: SensorStream
    drift: DriftTrigger
    presence: PresenceFactory
    transport: Transport
    health: HealthFile


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self._stop = threading.Event()
        self._fatal: FatalError | None = None
        self.parts = self._build()

    def _build(self) -> Parts:
        c = self.config
        state = prepare_state_dir(c.state_dir)
        data = load_data(c)
        model = data.model
        spool = open_spool(state, c.spool_max_messages)
        store = AdapterStore(state / "adapters", model.weights_hash)
        meter = detect_meter(c)
        topics = Topics(c.topic_root)
        # The outbox publishes through the transport, built last; the lambda binds it late.
        outbox = Outbox(spool, lambda item: transport.publish_spooled(item))
        # Job expiry is the coordinator's clock: judged on its estimate, not on the device's.
        offset = ClockOffset()
        history = JobHistory(state / "jobs.json", clock=offset.coordinator_now)
        kept = KeptResults(spool, history.expiry_of, clock=offset.coordinator_now)
        uplink = Uplink(c.device_id, topics, spool, boot_id=new_boot_id(),
                        on_spooled=outbox.notify, keeper=kept)  # fmt: skip
        inbox = AdapterInbox()
        choice = OwnChoice(store, DeclinedVersions(state / "adapters" / "declined.json"))
        handlers = JobHandlers(
            data,
            store,
            inbox,
            uplink,
            meter,
            choice=choice,
            fetch_timeout_seconds=c.fetch_timeout_seconds,
        )
        send_status = status_sender(uplink, lambda *publish: transport.publish_direct(*publish))
        runner = JobRunner(
            handlers.table(),
            send_status,
            history,
            base_model_hash=model.weights_hash,
            max_queued=c.max_queued_jobs,
            in_progress_after_seconds=c.in_progress_after_seconds,
            clock=offset.coordinator_now,
        )
        reconciler = Reconciler(
            data=data,
            store=store,
            inbox=inbox,
            send_fetch=uplink.send,
            between_jobs=runner.run_between_jobs,
            choice=choice,
            take_offer=runner.take_offer,
            policy=FetchPolicy(c.desired_retry_seconds, c.desired_max_fetches),
        )
        downlink = Downlink(
            c.device_id,
            topics,
            runner=runner,
            inbox=inbox,
            on_desired=reconciler.offer,
            clock_offset=offset,
            repeats=RepeatedJobs(history, kept, uplink, send_status),
        )
        # the window the calibration's thresholds hold for (agent/drift.py's, unless the model
        # was calibrated for another)
        window = model.calibration.window_rows if model.calibration else WINDOW_ROWS
        recent = RecentInputs(window, model.n_inputs)
        recent.add(data.current().stream)  # rows are in time order: the window keeps the latest
        telemetry = Telemetry(
            TelemetrySources(
                meter,
                spool,
                runner,
                store,
                data.current().learner,
                recent,
                lambda: handlers.last_cache_bytes,
                drifted=lambda: data.current().drifted,
                clock_offset=offset.offset,
            )
        )
        presence = PresenceFactory(c, data, meter, uplink)
        status_topic = topics.status(c.device_id)
        health = HealthFile(c.health_file)
        transport = Transport(
            c.mqtt,
            client_id=c.device_id,
            subscriptions=topics.device_subscriptions(c.device_id),
            status_topic=status_topic,
            will=Will(status_topic, presence(PresenceState.OFFLINE), delay_s=c.will_delay_seconds),
            online_payload=lambda: presence(PresenceState.ONLINE),
            outbox=outbox,
            on_message=downlink.handle,
            on_fatal=self._fail,
            on_connected=health.touch,
        )
        return Parts(
            data,
            spool,
            store,
            meter,
            uplink,
            outbox,
            runner,
            reconciler,
            downlink,
            telemetry,
            SensorStream(data, recent, c.stream_rows),
            DriftTrigger(data, c.drift_at_seconds),
            presence,
            transport,
            health,
        )

    @property
    def boot_id(self) -> str:
        return self.parts.uplink.boot_id

    def _fail(self, error: FatalError) -> None:
        log.error("%s", error)
        self._fatal = error
        self._stop.set()

    def request_stop(self) -> None:
        """Safe from a signal handler: only sets an event."""
        self._stop.set()

    def request_drift(self) -> None:
        """Switch to the drifted data (SIGUSR1). Safe from a signal handler: sets an event."""
        self.parts.drift.request()

    def run(self) -> ExitCode:
        p = self.parts
        heartbeats = HeartbeatLoop(
            p.telemetry,
            p.uplink.send,
            self.config.heartbeat_seconds,
            observe=p.stream.step,
            after_beat=lambda: p.health.touch() if p.transport.connected.is_set() else None,
        )
        p.meter.start()
        p.outbox.start()
        p.runner.start()
        p.reconciler.start()
        p.drift.start()
        p.transport.start()
        heartbeats.start()
        log.info("agent %s running (boot %s)", self.config.device_id, self.boot_id)
        try:
            self._stop.wait()
        finally:
            self._shutdown(heartbeats)
        return self._fatal.exit_code if self._fatal else ExitCode.OK

    def _shutdown(self, heartbeats: HeartbeatLoop) -> None:
        p = self.parts
        log.info("stopping")
        heartbeats.stop()
        p.drift.stop()
        p.reconciler.stop()
        p.runner.stop()  # cancels a running fine-tune; its FAILED status goes to the spool
        self._flush(SHUTDOWN_FLUSH_SECONDS)
        p.transport.stop(p.presence(PresenceState.OFFLINE))
        p.outbox.stop()
        p.meter.close()
        left = p.spool.stats().depth
        p.spool.close()
        log.info("stopped; %d messages stay spooled for the next start", left)

    def _flush(self, timeout: float) -> None:
        """Give the outbox a moment to deliver what the last job left in the spool."""
        deadline = time.monotonic() + timeout
        p = self.parts
        while p.spool.stats().depth and p.transport.connected.is_set():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
