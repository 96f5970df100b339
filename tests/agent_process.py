"""The agent as a process against a real mosquitto, and a test client playing the coordinator.

A test module's `fleet` fixture is `yield from run_fleet(mosquitto, files, tmp_path)`.
Every wait is on a condition with a timeout, never a fixed sleep.
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

from shared.mqtt import MqttSettings, connect_async, make_client
from shared.protocol import DecodeError, Reassembler, decode, encode, encode_for_publish
from shared.protocol.enums import JobKind, JobState, PresenceState
from shared.protocol.envelope import Envelope
from shared.protocol.messages import Heartbeat, Job, JobStatus, Message, Presence
from shared.topics import TopicKind, Topics

REPO = Path(__file__).resolve().parent.parent
DEVICE = "dev-1"
HOLDOUT_FRACTION, SEED = 0.25, 0
WAIT = 30.0  # seconds: generous for a loaded 2-core machine; passing runs take far less
TOPICS = Topics()
Match = Callable[[str, Envelope, bool], bool]


class Observer:
    """Plays the coordinator: a persistent-session client on `fleet/#`, decoding everything."""

    def __init__(self, port: int, client_id: str = "observer"):
        settings = MqttSettings("127.0.0.1", port, session_expiry_s=300, reconnect_max_delay_s=2)
        self.client = make_client(settings, client_id)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe("fleet/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
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

    def mark(self) -> int:
        """A point in what was received: `wait_for(..., after=mark)` looks only past it."""
        with self._changed:
            return len(self.received)

    def wait_for(self, match: Match, timeout: float = WAIT, after: int = 0) -> Envelope:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for item in self.received[after:]:
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

    def heartbeat(self, match: Callable[[Heartbeat], bool], after: int = 0) -> Heartbeat:
        return self.wait_for(
            lambda t, e, r: isinstance(e.message, Heartbeat) and match(e.message), after=after
        ).message

    def send_job(self, job: Job | bytes) -> None:
        payload = job if isinstance(job, bytes) else encode(job, sender="coordinator")
        info = self.client.publish(f"fleet/{DEVICE}/cmd/job", payload, qos=1)
        info.wait_for_publish(WAIT)

    def send(self, kind: TopicKind, message: Message, *, retain: bool = False) -> int:
        """Publish a coordinator message on the device's `kind` topic (chunked if large);
        returns the number of publishes."""
        assert self.subscribed.wait(WAIT), "the observer never connected"
        outgoing = encode_for_publish(message, sender="coordinator")
        for item in outgoing:
            info = self.client.publish(TOPICS.topic(DEVICE, kind), item.payload, 1, retain)
            info.wait_for_publish(WAIT)
        return len(outgoing)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AgentProcess:
    def __init__(self, port: int, files, state_dir: Path, log_path: Path, extra=(), data_path=None):
        self.state_dir = state_dir
        self.log_path = log_path
        data_path = data_path or files.device_data_path
        argv = [
            sys.executable, "-m", "skipfleet.cli", "agent", "--device-id", DEVICE,
            "--broker", f"mqtt://127.0.0.1:{port}", "--data", str(data_path),
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

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]


def run_fleet(broker, files, tmp_path: Path):
    """The body of a test module's `fleet` fixture: yields (start_agent, observer, broker)."""
    observer = Observer(broker.port)
    agents: list[AgentProcess] = []

    def start_agent(*extra: str, data_path: Path | None = None) -> AgentProcess:
        agent = AgentProcess(
            broker.port, files, tmp_path / "state", tmp_path / "agent.log", extra, data_path
        )
        agents.append(agent)
        return agent

    yield start_agent, observer, broker
    for agent in agents:
        agent.stop(signal.SIGKILL)
    observer.close()


def job(job_id: str, kind: JobKind, params, expires_in: float = 600) -> Job:
    return Job(job_id, kind, params, expires_at=time.time() + expires_in)
