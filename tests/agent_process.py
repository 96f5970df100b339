"""The agent as a process against a real mosquitto, and a test client playing the coordinator.

A test module's `fleet` fixture is `yield from run_fleet(mosquitto, files, tmp_path)`.
Every wait is on a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from shared.mqtt import MqttSettings
from shared.protocol.enums import JobKind, JobState, PresenceState
from shared.protocol.envelope import Envelope
from shared.protocol.messages import Heartbeat, Job, JobStatus, Message, Presence
from shared.topics import TopicKind, Topics
from skipfleet import processes
from skipfleet.probe import FleetProbe, Match

REPO = Path(__file__).resolve().parent.parent
DEVICE = "dev-1"
HOLDOUT_FRACTION, SEED = 0.25, 0
WAIT = 30.0  # seconds: generous for a loaded 2-core machine; passing runs take far less
TOPICS = Topics()


class Observer(FleetProbe):
    """Plays the coordinator for DEVICE: the product's probe on a private broker's port, with
    the tests' defaults (WAIT) and AssertionError instead of TimeoutError."""

    def __init__(self, port: int, client_id: str = "observer"):
        settings = MqttSettings("127.0.0.1", port, session_expiry_s=300, reconnect_max_delay_s=2)
        # every publish as it came off the wire, before reassembly drops repeated chunks: what
        # a test counts to prove a message arrived once
        self.publishes: list[tuple[str, bytes]] = []
        super().__init__(settings, client_id)

    def _on_message(self, client, userdata, message) -> None:
        self.publishes.append((message.topic, bytes(message.payload)))
        super()._on_message(client, userdata, message)

    def wait_for(self, match: Match, timeout: float = WAIT, after: int = 0) -> Envelope:
        try:
            return super().wait_for(match, timeout, after)[0]
        except TimeoutError as error:
            raise AssertionError(str(error)) from None

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
        return super().presence(state, WAIT, retained)

    def heartbeat(self, match: Callable[[Heartbeat], bool], after: int = 0) -> Heartbeat:
        return super().heartbeat(match, WAIT, after)

    def send_job(self, job: Job | bytes) -> None:
        super().send_job(DEVICE, job, WAIT)

    def send(self, kind: TopicKind, message: Message, *, retain: bool = False) -> int:
        return super().send(DEVICE, kind, message, retain=retain, timeout=WAIT)


class AgentProcess(processes.AgentProcess):
    """The product's agent process as DEVICE, with the tests' fast timings and DEBUG logs."""

    def __init__(self, port: int, files, state_dir: Path, log_path: Path, extra=(), data_path=None):
        test_args = (
            "--heartbeat-seconds", "2", "--will-delay-seconds", "0",
            "--reconnect-max-seconds", "2", "--holdout-fraction", str(HOLDOUT_FRACTION),
            "--seed", str(SEED), "--log-level", "DEBUG",
        )  # fmt: skip
        broker, data = f"mqtt://127.0.0.1:{port}", data_path or files.device_data_path
        super().__init__(DEVICE, broker, data, files.base_model_path, state_dir, log_path,
                         (*test_args, *extra))  # fmt: skip

    def spooled_topics(self) -> list[str]:
        with sqlite3.connect(self.state_dir / "spool.sqlite") as db:
            return [row[0] for row in db.execute("SELECT topic FROM outbox")]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        return super().stop(sig, timeout=WAIT)

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
