"""A mosquitto SIGKILLed mid-round with sessions younger than its autosave loses no report: the
coordinator asks again (coordinator.reask) and the agents answer with the results they kept
(agent.kept_results, agent.repeats). Real processes: mosquitto, two `skipfleet agent`s; the
coordinator's fleet state and MQTT bridge in this process (no Ray: the delivery is the subject).

The worst case is made on purpose, not waited for: the coordinator's link is cut once the broker
has the jobs and before the agents (stopped meanwhile) take them, so their reports are
acknowledged by the broker (and leave the agents' spools) but sit in the coordinator's session
when mosquitto is killed, before any autosave. One agent is
back before the coordinator (asked when the coordinator's session turns out lost), the other
after it (asked when its own presence arrives).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from coordinator.bridge import MqttBridge
from coordinator.metrics import FleetMetrics
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.mqtt import parse_broker_url
from shared.protocol import JobState
from skipfleet.fleet.base import CutMode
from skipfleet.fleet.proxy import ProxyLoop
from skipfleet.processes import AgentProcess
from tests.coord_fleet_helpers import make_config
from tests.mqtt_broker import MosquittoBroker, find_mosquitto
from tests.test_coord_integration import fan_world  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

WAIT = 90.0  # seconds: generous for a loaded 2-core machine; passing runs take far less
# Nothing is written to disk before the kill: every session is younger than the autosave.
YOUNG_SESSIONS = ["autosave_interval 3600"]
AGENT_OPTIONS = ("--heartbeat-seconds", "1", "--will-delay-seconds", "0",
                 "--reconnect-max-seconds", "2", "--power-profile", "generic")  # fmt: skip


def wait_until(what: str, condition, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


class Coordinator:
    """The fleet state and its MQTT bridge, connected through a proxy that can be cut."""

    def __init__(self, tmp: Path, url: str):
        settings = parse_broker_url(url, session_expiry_s=600, reconnect_max_delay_s=1)
        config = dataclasses.replace(
            make_config(tmp / "coordinator", job_timeout_s=150.0, round_deadline_s=180.0),
            mqtt=settings,
            tick_interval_s=0.2,
            metrics_interval_s=0.5,
        )
        self.service = FleetService(config)
        self.port = LocalFleetPort(self.service)
        self.metrics = FleetMetrics()
        self.bridge = MqttBridge(config, self.port, self.metrics)

    def jobs(self) -> dict[str, dict]:
        return {j["device_id"]: j for j in self.port.read("jobs")}

    def states(self) -> dict[str, str]:
        return {device: job["state"] for device, job in self.jobs().items()}

    def state(self, device: str) -> str:
        return self.states()[device]

    def online(self) -> int:
        return sum(device["online"] for device in self.port.read("devices"))

    def all_sent(self) -> bool:
        """Jobs made, and the broker acknowledged every outbox row (they are in its sessions)."""
        return bool(self.jobs()) and self.port.health()["outbox_backlog"] == 0

    def ended(self, round_id: str) -> dict | None:
        rounds = self.port.read("rounds")
        found = next((r for r in rounds if r["round_id"] == round_id), None)
        return found if found and found["stage"] not in ("RUNNING", "AGGREGATING") else None

    def reports_taken(self) -> float:
        return sum(
            sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "skipfleet_finetune_duration_seconds_count"
        )


def finished_and_acknowledged(agent: AgentProcess) -> bool:
    """The agent's job SUCCEEDED and the broker acknowledged every record it spooled."""
    try:
        jobs = json.loads((agent.state_dir / "jobs.json").read_text())
        with sqlite3.connect(agent.state_dir / "spool.sqlite") as db:
            (records,) = db.execute("SELECT COUNT(*) FROM outbox WHERE priority = 1").fetchone()
    except (OSError, ValueError, sqlite3.Error):
        return False
    states = [job["state"] for job in jobs.values()]
    return states == [JobState.SUCCEEDED.value] and records == 0


@pytest.fixture
def broker(tmp_path):
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make system-deps`")
    broker = MosquittoBroker(tmp_path / "mosquitto", extra_config=YOUNG_SESSIONS)
    broker.start()
    yield broker
    broker.stop()


def test_a_broker_sigkilled_with_young_sessions_mid_round_loses_no_report(
    broker,
    fan_world,  # noqa: F811
    tmp_path,
):
    proxies = ProxyLoop()
    to_coordinator = proxies.open("127.0.0.1", broker.port, name="coordinator")
    to_late = proxies.open("127.0.0.1", broker.port, name="dev-late")
    coordinator = Coordinator(tmp_path, f"mqtt://127.0.0.1:{to_coordinator.port}")
    links = {"dev-early": broker.url, "dev-late": f"mqtt://127.0.0.1:{to_late.port}"}
    agents = {
        name: AgentProcess(name, url, fan_world.device_data[k], fan_world.base_model,
                           tmp_path / name, tmp_path / f"{name}.log", AGENT_OPTIONS)
        for k, (name, url) in enumerate(links.items())
    }  # fmt: skip
    try:
        coordinator.bridge.start()
        wait_until("both devices online", lambda: coordinator.online() == 2)
        for agent in agents.values():
            agent.send_signal(signal.SIGSTOP)  # they take their jobs once we are cut off
        (opened,) = coordinator.port.request_finetune(None, None, True)["rounds"]
        wait_until("the broker has both jobs", coordinator.all_sent)
        to_coordinator.cut(CutMode.REFUSE)  # the reports will wait in the coordinator's session
        for agent in agents.values():
            agent.send_signal(signal.SIGCONT)
        for agent in agents.values():
            wait_until(f"{agent.device_id} done", lambda a=agent: finished_and_acknowledged(a))
        to_late.cut(CutMode.REFUSE)
        broker.kill()  # SIGKILL before any autosave: every session and queued message is gone
        broker.start()
        assert coordinator.states() == {"dev-early": "QUEUED", "dev-late": "QUEUED"}

        to_coordinator.restore()  # no session: the open jobs are asked again
        wait_until("dev-early's kept report", lambda: coordinator.state("dev-early") == "SUCCEEDED")
        assert coordinator.state("dev-late") == "QUEUED"  # it missed that: not back yet
        to_late.restore()  # its presence has its open job asked again
        stored = wait_until("the round stored", lambda: coordinator.ended(opened["round_id"]))
        time.sleep(1.0)  # metrics are applied every 0.5 s
        assert stored["stage"] == "STORED", stored
        assert sorted(stored["answered"]) == ["dev-early", "dev-late"]
        assert coordinator.reports_taken() == 2  # each report applied once
        for name, agent in agents.items():
            assert "result sent again" in agent.log_path.read_text(), name
    finally:
        for agent in agents.values():
            agent.stop()
        coordinator.bridge.stop()
        coordinator.service.close()
        proxies.close()
