"""The agent as a process against a real mosquitto (a private one on a free port).

A test client plays the coordinator: it watches `fleet/#` and sends jobs. Every wait is on a
condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import numpy as np
import pytest

from agent.data.dataset import holdout_split
from agent.trainer.adapter import Adapter
from shared.mqtt import MqttSettings, connect_async, make_client
from shared.protocol import DecodeError, Reassembler, decode, encode
from shared.protocol.enums import JobKind, JobReason, JobState, PresenceState
from shared.protocol.envelope import Envelope
from shared.protocol.messages import (
    EvaluateParams,
    FinetuneParams,
    Job,
    JobStatus,
    Presence,
    Report,
)
from tests.agent_fixtures import fan_files  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DEVICE = "dev-1"
HOLDOUT_FRACTION, SEED = 0.25, 0
WAIT = 30.0  # seconds: generous for a loaded 2-core machine; passing runs take far less


class Observer:
    """Plays the coordinator: a persistent-session client on `fleet/#`, decoding everything."""

    def __init__(self, port: int, client_id: str = "observer"):
        settings = MqttSettings("127.0.0.1", port, session_expiry_s=300, reconnect_max_delay_s=2)
        self.client = make_client(settings, client_id)
        self.client.on_connect = lambda c, *a: c.subscribe("fleet/#", qos=1)
        self.client.on_message = self._on_message
        self.received: list[tuple[str, Envelope, bool]] = []  # topic, envelope, retained
        self._changed = threading.Condition()
        self._reassembler = Reassembler()
        connect_async(self.client, settings)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        try:
            envelope = self._reassembler.feed(decode(message.payload))
        except DecodeError:
            return
        if envelope is not None:
            with self._changed:
                self.received.append((message.topic, envelope, bool(message.retain)))
                self._changed.notify_all()

    def wait_for(self, match: Callable[[str, Envelope, bool], bool], timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for item in self.received:
                    if match(*item):
                        return item[1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kinds = [(t, type(e.message).__name__) for t, e, _ in self.received[-10:]]
                    raise AssertionError(f"nothing matched within {timeout} s; last: {kinds}")
                self._changed.wait(remaining)

    def status_of(self, job_id: str, state: JobState, timeout: float = WAIT) -> JobStatus:
        return self.wait_for(
            lambda t, e, r: (
                isinstance(e.message, JobStatus)
                and e.message.job_id == job_id
                and e.message.state is state
            ),
            timeout,
        ).message

    def presence(self, state: PresenceState, retained: bool | None = None) -> Presence:
        return self.wait_for(
            lambda t, e, r: (
                isinstance(e.message, Presence)
                and e.message.state is state
                and (retained is None or r == retained)
            )
        ).message

    def send_job(self, job: Job | bytes) -> None:
        payload = job if isinstance(job, bytes) else encode(job, sender="coordinator")
        info = self.client.publish(f"fleet/{DEVICE}/cmd/job", payload, qos=1)
        info.wait_for_publish(WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProcess:
    def __init__(self, port: int, files, state_dir: Path, log_path: Path, extra=()):
        self.state_dir = state_dir
        self.log_path = log_path
        argv = [
            sys.executable, "-m", "skipfleet.cli", "agent", "--device-id", DEVICE,
            "--broker", f"mqtt://127.0.0.1:{port}", "--data", str(files.device_data_path),
            "--base-model", str(files.base_model_path), "--state-dir", str(state_dir),
            "--heartbeat-seconds", "2", "--will-delay-seconds", "0",
            "--reconnect-max-seconds", "2", "--holdout-fraction", str(HOLDOUT_FRACTION),
            "--seed", str(SEED), "--log-level", "DEBUG", *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)  # fmt: skip

    def spooled_topics(self) -> list[str]:
        with sqlite3.connect(self.state_dir / "spool.sqlite") as db:
            return [row[0] for row in db.execute("SELECT topic FROM outbox")]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=WAIT)
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def fleet(mosquitto, fan_files, tmp_path):  # noqa: F811
    observer = Observer(mosquitto.port)
    agents: list[AgentProcess] = []

    def start_agent(*extra: str) -> AgentProcess:
        agent = AgentProcess(
            mosquitto.port, fan_files, tmp_path / "state", tmp_path / "agent.log", extra
        )
        agents.append(agent)
        return agent

    yield start_agent, observer, mosquitto
    for agent in agents:
        agent.stop(signal.SIGKILL)
    observer.close()


def job(job_id: str, kind: JobKind, params, expires_in: float = 600) -> Job:
    return Job(job_id, kind, params, expires_at=time.time() + expires_in)


def test_presence_is_retained_online_and_the_will_says_offline_after_kill_9(fleet):
    start_agent, observer, mosquitto = fleet
    agent = start_agent()
    online = observer.presence(PresenceState.ONLINE)
    assert online.base_model_hash and online.device["power_source"].startswith("model:")
    late = Observer(mosquitto.port, "late-joiner")  # retained: a later subscriber sees it too
    try:
        late.presence(PresenceState.ONLINE, retained=True)
    finally:
        late.close()
    agent.process.kill()  # SIGKILL: no clean shutdown, only the broker's Will speaks now
    agent.process.wait(WAIT)
    offline = observer.presence(PresenceState.OFFLINE)
    assert offline.boot_id == online.boot_id
    after = Observer(mosquitto.port, "after-death")
    try:
        after.presence(PresenceState.OFFLINE, retained=True)
    finally:
        after.close()


def test_sigterm_announces_offline_and_exits_zero(fleet):
    start_agent, observer, _ = fleet
    agent = start_agent()
    observer.presence(PresenceState.ONLINE)
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    observer.presence(PresenceState.OFFLINE)


def test_a_finetune_job_succeeds_and_its_adapter_improves_holdout_accuracy(fleet, fan_files):  # noqa: F811
    start_agent, observer, _ = fleet
    start_agent()
    observer.presence(PresenceState.ONLINE)
    observer.send_job(job("ft-1", JobKind.FINETUNE, FinetuneParams(epochs=30, lr=0.05, seed=1)))
    observer.status_of("ft-1", JobState.IN_PROGRESS)
    done = observer.status_of("ft-1", JobState.SUCCEEDED)
    report = observer.wait_for(lambda t, e, r: isinstance(e.message, Report)).message
    metrics = report.metrics
    assert report.job_id == "ft-1" and metrics.accuracy_after > metrics.accuracy_before
    assert done.detail["installed"] is True
    # Check the claim independently: the same hold-out, the model, the reported adapter.
    model = fan_files.model
    _, holdout = holdout_split(fan_files.device_data, HOLDOUT_FRACTION, seed=SEED)
    adapter = Adapter.from_arrays(dict(report.adapter), model.layer_input_dims, model.n_classes)
    base = model.accuracy(holdout.X, holdout.y)
    assert model.accuracy(holdout.X, holdout.y, adapter) == pytest.approx(metrics.accuracy_after)
    assert metrics.accuracy_after > base + 0.2  # the drift is large: ~0.6 -> > 0.9
    evaluate = job("ev-1", JobKind.EVALUATE, EvaluateParams())
    observer.send_job(evaluate)  # the device now runs the new adapter
    assert observer.status_of("ev-1", JobState.SUCCEEDED).detail["accuracy"] == pytest.approx(
        metrics.accuracy_after
    )


def test_a_report_made_while_the_broker_is_down_arrives_once_after_it_restarts(fleet):
    start_agent, observer, mosquitto = fleet
    agent = start_agent()
    observer.presence(PresenceState.ONLINE)
    # Long enough to still be running when the broker goes away (~1 ms per epoch).
    observer.send_job(
        job("ft-away", JobKind.FINETUNE, FinetuneParams(epochs=3000, lr=0.01, seed=0))
    )
    observer.status_of("ft-away", JobState.IN_PROGRESS)
    mosquitto.stop()
    deadline = time.monotonic() + WAIT
    while f"fleet/{DEVICE}/report" not in agent.spooled_topics():
        assert time.monotonic() < deadline, agent.log()
        assert agent.process.poll() is None, agent.log()
        time.sleep(0.1)
    mosquitto.start()
    observer.status_of("ft-away", JobState.SUCCEEDED)  # sent after the report, same order
    reports = [e for t, e, r in observer.received if isinstance(e.message, Report)]
    assert {e.dedup_key for e in reports} == {reports[0].dedup_key}
    assert reports[0].message.job_id == "ft-away"
    deadline = time.monotonic() + WAIT
    while f"fleet/{DEVICE}/report" in agent.spooled_topics():  # deleted on PUBACK
        assert time.monotonic() < deadline
        time.sleep(0.05)


def padded_job(job_id: str, **body: object) -> bytes:
    """A valid evaluate job re-packed with changed or extra body fields."""
    envelope = msgpack.unpackb(encode(job(job_id, JobKind.EVALUATE, EvaluateParams()),
                                      sender="coordinator"))  # fmt: skip
    envelope["body"].update(body)
    return msgpack.packb(envelope, use_bin_type=True)


def test_malformed_oversized_and_expired_jobs_are_rejected_and_the_agent_keeps_serving(fleet):
    start_agent, observer, _ = fleet
    start_agent()
    observer.presence(PresenceState.ONLINE)
    observer.send_job(padded_job("bad-1", expires_at="soon"))
    observer.send_job(padded_job("big-1", padding=b"\0" * 64_000))
    observer.send_job(job("old-1", JobKind.EVALUATE, EvaluateParams(), expires_in=-1))
    reasons = {
        job_id: observer.status_of(job_id, JobState.REJECTED)
        for job_id in ("bad-1", "big-1", "old-1")
    }
    assert reasons["bad-1"].reason_code is JobReason.MALFORMED
    assert reasons["big-1"].reason_code is JobReason.MALFORMED
    assert "exceeds" in reasons["big-1"].reason
    assert reasons["old-1"].reason_code is JobReason.EXPIRED
    observer.send_job(job("ok-1", JobKind.EVALUATE, EvaluateParams()))
    accuracy = observer.status_of("ok-1", JobState.SUCCEEDED).detail["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and np.isfinite(accuracy)


def test_mqtt_3_1_1_fallback_serves_jobs(fleet):
    start_agent, observer, _ = fleet
    start_agent("--mqtt-version", "3.1.1")
    observer.presence(PresenceState.ONLINE)
    observer.send_job(job("ev-311", JobKind.EVALUATE, EvaluateParams()))
    assert observer.status_of("ev-311", JobState.SUCCEEDED).detail["holdout_samples"] > 0


def test_a_broker_refusing_the_credentials_ends_the_agent_with_exit_77(fan_files, tmp_path):  # noqa: F811
    from tests.mqtt_broker import MosquittoBroker

    password_file = tmp_path / "passwd"
    password_file.write_text("")  # no accounts at all: every login is refused
    broker = MosquittoBroker(
        tmp_path / "strict",
        extra_config=["allow_anonymous false", f"password_file {password_file}"],
    )
    broker.start()
    try:
        agent = AgentProcess(broker.port, fan_files, tmp_path / "state", tmp_path / "agent.log")
        code = agent.process.wait(WAIT)
        agent.stop()  # closes its log
        assert code == 77, agent.log()
        assert "refused" in agent.log()
    finally:
        broker.stop()
