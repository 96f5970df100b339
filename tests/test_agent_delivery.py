"""Agent-side delivery (issue 10): paho callbacks only enqueue, each spooled row is handed to paho
once per client (no second copy after an outage), job expiry on the coordinator's clock, and a
job whose state cannot be written fails `disk_full` instead of waiting for its deadline."""

from __future__ import annotations

import errno
import queue
import sqlite3
import threading
import time

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.adapter_inbox import AdapterInbox
from agent.clock_offset import ClockOffset
from agent.downlink import Downlink
from agent.job_history import JobHistory
from agent.jobs import JobOutcome, JobRunner
from agent.outbox import Outbox
from agent.spool import Priority, Spool
from agent.startup import status_sender
from agent.transport import Transport
from agent.uplink import Uplink
from shared.mqtt import Will, connect_async, make_client, parse_broker_url
from shared.protocol import decode, encode
from shared.protocol.enums import JobKind, JobReason, JobState
from shared.protocol.messages import (
    AdapterPublication,
    DesiredState,
    EvaluateParams,
    Job,
    JobStatus,
    Lineage,
)
from shared.topics import Topics
from skipfleet.fleet.base import CutMode
from skipfleet.fleet.proxy import ProxyLoop

TOPICS = Topics()
DEVICE = "dev-1"
NOW = 1_700_000_000.0


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} not met in {timeout} s"
        time.sleep(0.01)
    return value


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def evaluate_job(job_id: str, expires_at: float) -> Job:
    return Job(job_id, JobKind.EVALUATE, EvaluateParams(), expires_at=expires_at)


class Watcher:
    """A plain client on the broker that records every publish under the device's topics."""

    def __init__(self, url: str):
        self.received: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        settings = parse_broker_url(url)
        self.client = make_client(settings, "watcher")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"fleet/{DEVICE}/#", qos=1)
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, m.payload))
        connect_async(self.client, settings)
        self.client.loop_start()
        assert self._subscribed.wait(10), "watcher did not subscribe"

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload in self.received if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def agent_transport(url: str, outbox: Outbox, on_message) -> Transport:
    status = TOPICS.status(DEVICE)
    return Transport(
        parse_broker_url(url, keepalive_s=5, reconnect_max_delay_s=2),
        client_id=DEVICE,
        subscriptions=TOPICS.device_subscriptions(DEVICE),
        status_topic=status,
        will=Will(status, b"offline"),
        online_payload=lambda: b"online",
        outbox=outbox,
        on_message=on_message,
        on_fatal=lambda err: None,
    )


# ---- 1. paho's callbacks only enqueue -------------------------------------------------------


class BlockedHistory(JobHistory):
    """A job history whose disk write hangs (an SD card under load) until `release` is set."""

    def __init__(self, path):
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.writer_thread: str | None = None

    def record(self, job_id, expires_at, state):
        self.writer_thread = threading.current_thread().name
        self.entered.set()
        assert self.release.wait(10), "never released"
        super().record(job_id, expires_at, state)


def test_a_job_callback_returns_while_its_history_write_blocks_and_paho_keeps_serving(
    mosquitto, tmp_path
):
    spool = Spool(tmp_path / "s.sqlite", max_messages=100)
    history = BlockedHistory(tmp_path / "jobs.json")
    runner = JobRunner({JobKind.EVALUATE: lambda job, ctx: JobOutcome()}, lambda s: None,
                       history, base_model_hash="h")  # fmt: skip
    downlink = Downlink(DEVICE, TOPICS, runner=runner, inbox=AdapterInbox())
    outbox = Outbox(spool, lambda item: transport.publish_spooled(item))
    transport = agent_transport(mosquitto.url, outbox, downlink.handle)
    coordinator = make_client(parse_broker_url(mosquitto.url), "coordinator")
    try:
        transport.start()
        assert transport.connected.wait(10)
        connect_async(coordinator, parse_broker_url(mosquitto.url))
        coordinator.loop_start()
        job = evaluate_job("j-1", time.time() + 300)
        coordinator.publish(TOPICS.cmd_job(DEVICE), encode(job, sender="coordinator"), qos=1)
        assert history.entered.wait(10), "the job never reached the history"
        # The write hangs on the handoff worker, not on paho's network thread ...
        assert history.writer_thread == "mqtt-worker"
        # ... which meanwhile still sends and receives: a QoS 1 publish gets its PUBACK.
        info = transport._client.publish(TOPICS.status(DEVICE), b"still-here", qos=1)
        info.wait_for_publish(10)
        assert info.is_published() and not history.release.is_set()
    finally:
        history.release.set()
        transport.stop(b"offline")
        coordinator.disconnect()
        coordinator.loop_stop()
        spool.close()
    assert history.get("j-1").state is JobState.QUEUED  # handled once released


def test_a_puback_deletes_its_spool_row_on_the_worker_not_in_the_callback(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_messages=10)
    outbox = Outbox(spool, lambda item: 7)
    transport = agent_transport("mqtt://127.0.0.1:1", outbox, lambda *message: None)
    spool.put("fleet/dev-1/job", b"a", priority=Priority.RECORD)
    outbox.connected()
    outbox.pump()
    ok = ReasonCode(PacketTypes.PUBACK, identifier=0)
    transport._client.on_publish(transport._client, None, 7, ok, None)  # the worker is not running
    assert spool.stats().depth == 1  # the callback only queued the work
    transport.handoff.start()
    try:
        assert transport.handoff.drain()
        assert spool.stats().depth == 0
    finally:
        transport.handoff.stop()
        spool.close()


# ---- 2. no second copy after an outage ------------------------------------------------------


def test_an_outage_longer_than_a_minute_puts_each_message_on_the_broker_once(mosquitto, tmp_path):
    """Issue 10: after > 60 s the outbox re-published its in-flight rows while paho re-sent its
    own copies: 4 sends for 2 messages. Now paho alone re-sends what it holds."""
    loop = ProxyLoop()
    proxy = loop.open("127.0.0.1", mosquitto.port)
    spool = Spool(tmp_path / "s.sqlite", max_messages=100)
    clock = FakeClock()
    outbox = Outbox(spool, lambda item: transport.publish_spooled(item), clock=clock)
    transport = agent_transport(f"mqtt://127.0.0.1:{proxy.port}", outbox, lambda *m: None)
    watcher = Watcher(mosquitto.url)
    topic = TOPICS.job(DEVICE)
    try:
        transport.start()
        outbox.start()
        assert transport.connected.wait(10)
        proxy.cut(CutMode.BLACKHOLE)  # the link dies silently: paho still thinks it is up
        for name in (b"first", b"second"):
            spool.put(topic, name, priority=Priority.RECORD)
        outbox.notify()
        wait_for(lambda: outbox.stats().in_flight == 2, what="2 rows handed to paho")
        proxy.cut(CutMode.REFUSE)  # ... then it breaks: what paho sent never reached the broker
        wait_for(lambda: not transport.connected.is_set(), what="disconnect")
        clock.now += 120  # a 2-minute outage, as the outbox's clock sees it
        outbox.notify()
        proxy.restore()
        wait_for(lambda: spool.stats().depth == 0, 20, "both rows acknowledged")
        spool.put(topic, b"marker", priority=Priority.RECORD)  # everything before it has arrived
        outbox.notify()
        wait_for(lambda: b"marker" in watcher.on(topic), what="the marker")
    finally:
        outbox.stop()
        transport.stop(b"offline")
        watcher.close()
        loop.close()
        spool.close()
    assert sorted(watcher.on(topic)) == [b"first", b"marker", b"second"]
    assert outbox.handed_over == 3


# ---- 3. job expiry on the coordinator's clock -----------------------------------------------


def test_the_clock_offset_is_the_smallest_recent_sample_and_old_samples_expire():
    local, mono = FakeClock(NOW + 3600), FakeClock(0.0)
    offset = ClockOffset(clock=local, monotonic=mono, window_seconds=600)
    assert offset.offset() is None and offset.coordinator_now() == NOW + 3600
    offset.observe(NOW - 30)  # waited 30 s in the broker's queue
    offset.observe(NOW - 0.2)
    assert offset.offset() == pytest.approx(3600.2)
    assert offset.coordinator_now() == pytest.approx(NOW - 0.2)
    mono.now = 700.0  # NTP fixed the device clock meanwhile
    local.now = NOW + 700
    offset.observe(NOW + 699.9)
    assert offset.offset() == pytest.approx(0.1)


def runner_with_offset(tmp_path, local):
    statuses: queue.Queue = queue.Queue()
    offset = ClockOffset(clock=local)
    runner = JobRunner({JobKind.EVALUATE: lambda job, ctx: JobOutcome()}, statuses.put,
                       JobHistory(tmp_path / "jobs.json", clock=offset.coordinator_now),
                       base_model_hash="h", clock=offset.coordinator_now)  # fmt: skip
    downlink = Downlink(DEVICE, TOPICS, runner=runner, inbox=AdapterInbox(), clock_offset=offset)
    return downlink, runner, statuses, offset


def test_a_device_an_hour_ahead_takes_fresh_jobs_and_still_rejects_stale_ones(tmp_path):
    local = FakeClock(NOW + 3600)  # the coordinator's clock reads NOW
    downlink, runner, statuses, _ = runner_with_offset(tmp_path, local)
    fresh = evaluate_job("fresh", NOW + 300)
    downlink.handle(TOPICS.cmd_job(DEVICE), encode(fresh, sender="coordinator", sent_at=NOW))
    assert statuses.empty() and runner.busy_job_id is None  # queued, not rejected
    assert len(runner._queue) == 1
    stale = evaluate_job("stale", NOW - 10)  # sent long ago, expired by the coordinator's clock
    downlink.handle(TOPICS.cmd_job(DEVICE), encode(stale, sender="coordinator", sent_at=NOW - 400))
    status = statuses.get_nowait()
    assert (status.job_id, status.reason_code) == ("stale", JobReason.EXPIRED)


def test_a_retained_desired_pointer_does_not_move_the_clock_offset(tmp_path):
    downlink, _, _, offset = runner_with_offset(tmp_path, FakeClock(NOW))
    old = encode(DesiredState(3, "h", "fan-h"), sender="coordinator", sent_at=NOW - 7200)
    downlink.handle(TOPICS.cmd_desired(DEVICE), old, retained=True)
    assert offset.offset() is None
    fresh = encode(DesiredState(3, "h", "fan-h"), sender="coordinator", sent_at=NOW - 0.5)
    downlink.handle(TOPICS.cmd_desired(DEVICE), fresh)
    assert offset.offset() == pytest.approx(0.5)


# ---- 4. a full disk -------------------------------------------------------------------------


class FullDiskHistory(JobHistory):
    """Writing the given states fails as on a full disk: OSError(ENOSPC) from the file write."""

    def __init__(self, path, failing: set[JobState]):
        super().__init__(path, clock=lambda: NOW)
        self._failing = failing
        self._full = False

    def record(self, job_id, expires_at, state):
        self._full = state in self._failing
        super().record(job_id, expires_at, state)

    def _save(self):
        if self._full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._save()


def disk_full_runner(tmp_path, failing, handler=None):
    statuses: queue.Queue = queue.Queue()
    ran = threading.Event()

    def evaluate(job, ctx):
        ran.set()
        return handler(job, ctx) if handler else JobOutcome()

    history = FullDiskHistory(tmp_path / "jobs.json", failing)
    runner = JobRunner({JobKind.EVALUATE: evaluate}, statuses.put, history, base_model_hash="h",
                       clock=lambda: NOW)  # fmt: skip
    return runner, statuses, ran


def terminal(statuses: queue.Queue) -> JobStatus:
    while not (status := statuses.get(timeout=10)).terminal:
        pass
    return status


def test_a_job_whose_acceptance_cannot_be_written_fails_disk_full_at_once(tmp_path):
    runner, statuses, ran = disk_full_runner(tmp_path, {JobState.QUEUED})
    runner.start()
    try:
        status = runner.submit(evaluate_job("j-1", NOW + 300))
        assert (status.state, status.reason_code) == (JobState.FAILED, JobReason.DISK_FULL)
        assert statuses.get_nowait() == status and "No space left" in status.reason
        again = runner.submit(evaluate_job("j-1", NOW + 300))  # a redelivery: still known
        assert again.reason_code is JobReason.DUPLICATE
    finally:
        runner.stop()
    assert not ran.is_set()


def test_a_job_whose_start_cannot_be_written_fails_disk_full_without_running(tmp_path):
    runner, statuses, ran = disk_full_runner(tmp_path, {JobState.IN_PROGRESS})
    runner.start()
    try:
        assert runner.submit(evaluate_job("j-1", NOW + 300)) is None  # queued
        status = terminal(statuses)
    finally:
        runner.stop()
    assert (status.state, status.reason_code) == (JobState.FAILED, JobReason.DISK_FULL)
    assert not ran.is_set()


def test_a_handler_out_of_disk_space_fails_disk_full_not_internal_error(tmp_path):
    def no_room(job, ctx):
        raise OSError(errno.ENOSPC, "No space left on device", "adapters/current.npz")

    runner, statuses, _ = disk_full_runner(tmp_path, set(), handler=no_room)
    runner.start()
    try:
        runner.submit(evaluate_job("j-1", NOW + 300))
        status = terminal(statuses)
    finally:
        runner.stop()
    assert (status.state, status.reason_code) == (JobState.FAILED, JobReason.DISK_FULL)


def test_a_status_the_full_spool_cannot_take_is_published_directly(tmp_path):
    spool = Spool(tmp_path / "s.sqlite", max_messages=10)
    uplink = Uplink(DEVICE, TOPICS, spool, boot_id="b1")
    published: list[tuple[str, bytes, int]] = []

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    spool.put_all = full
    send = status_sender(uplink, lambda *publish: published.append(publish))
    send(JobStatus("j-1", JobState.FAILED, reason_code=JobReason.DISK_FULL))
    spool.close()
    ((topic, payload, qos),) = published
    assert (topic, qos) == (TOPICS.job(DEVICE), 1)
    message = decode(payload).message
    assert (message.job_id, message.reason_code) == ("j-1", JobReason.DISK_FULL)


def test_one_message_stamped_a_day_ahead_does_not_make_fresh_jobs_expire(tmp_path):
    local = FakeClock(NOW)
    downlink, runner, statuses, offset = runner_with_offset(tmp_path, local)
    for n in range(3):
        downlink.handle(TOPICS.cmd_desired(DEVICE), encode(DesiredState(n, "h", "fan-h"),
                        sender="coordinator", sent_at=NOW - 0.1))  # fmt: skip
    glitch = encode(DesiredState(3, "h", "fan-h"), sender="coordinator", sent_at=NOW + 86_400)
    downlink.handle(TOPICS.cmd_desired(DEVICE), glitch)  # the coordinator's clock jumped a moment
    assert offset.offset() == pytest.approx(0.1)
    fresh = evaluate_job("fresh", NOW + 300)
    downlink.handle(TOPICS.cmd_job(DEVICE), encode(fresh, sender="coordinator", sent_at=NOW))
    assert statuses.empty() and len(runner._queue) == 1  # queued, not rejected as expired


def test_a_real_step_of_the_coordinators_clock_is_believed_from_its_second_message():
    local, mono = FakeClock(NOW), FakeClock(0.0)
    offset = ClockOffset(clock=local, monotonic=mono)
    offset.observe(NOW - 0.1)
    offset.observe(NOW - 0.2)
    offset.observe(NOW + 120)  # the coordinator's NTP stepped its clock 2 min ahead
    assert offset.offset() == pytest.approx(0.1)
    offset.observe(NOW + 120.1)
    assert offset.offset() == pytest.approx(-120.1)


def test_an_adapter_carried_inline_by_the_pointer_is_in_the_inbox_before_the_pointer_is_judged(
    tmp_path,
):
    runner = JobRunner({}, lambda status: None, JobHistory(tmp_path / "jobs.json"),
                       base_model_hash="h")  # fmt: skip
    inbox, seen = AdapterInbox(), []
    downlink = Downlink(DEVICE, TOPICS, runner=runner, inbox=inbox,
                        on_desired=lambda d: seen.append(inbox.get(3)))  # fmt: skip
    arrays = {"delta1": np.zeros((4, 2), np.float32)}
    adapter = AdapterPublication(3, "h", "fan-h", arrays, Lineage("r", (DEVICE,), "fedavg"), 1.0)
    pointer = DesiredState(3, "h", "fan-h", adapter=adapter, job_id="apply-3", expires_at=NOW)
    downlink.handle(TOPICS.cmd_desired(DEVICE), encode(pointer, sender="coordinator"))
    (held,) = seen
    assert held is not None and held.version == 3
    np.testing.assert_array_equal(held.arrays["delta1"], arrays["delta1"])
