"""The coordinator for real: its Ray actor on the session's Ray, a private mosquitto, and agent
processes (`skipfleet agent`) fine-tuning a fan base model on their own drifted data.

Every wait is on a condition read from the coordinator's HTTP API, with a timeout; nothing
sleeps for correctness.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.data.dataset import Dataset
from agent.data.fan import load_fan_split
from agent.device_data import write_device_file
from agent.trainer.finetune import pretrain
from coordinator.app import Coordinator
from coordinator.config import AggregationRunner, CoordinatorConfig, FinetuneSettings
from coordinator.federation import FederationPolicy
from coordinator.rollout import RolloutPolicy
from coordinator.scheduler import SchedulerPolicy
from shared.mqtt import parse_broker_url
from skipfleet.coordinator_process import ApiClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SKIPFLEET = [sys.executable, "-m", "skipfleet.cli"]
AGENT_COMMAND = [*SKIPFLEET, "agent"]
COORDINATOR_COMMAND = [*SKIPFLEET, "coordinator"]
STATUS_COMMAND = [*SKIPFLEET, "status"]
WAIT = 45.0  # seconds: generous for a loaded 2-core machine; passing runs take far less


@dataclass(frozen=True)
class FanWorld:
    base_model: Path
    device_data: list[Path]  # drifted (noisy-room) data, one disjoint share per device
    permuted_data: Path  # labels shifted by one: an adapter trained on it is wrong elsewhere


@pytest.fixture(scope="module")
def fan_world(data_dir, tmp_path_factory) -> FanWorld:
    root = tmp_path_factory.mktemp("fan-world")
    silent = load_fan_split(data_dir, "damage1", "pretrain")
    noisy = load_fan_split(data_dir, "damage1", "finetune")
    pretrain(silent.X, silent.y, 3, epochs=20, lr=0.05, seed=0).save(root / "base.npz")
    order = np.random.default_rng(0).permutation(len(noisy))
    paths = []
    for i, rows in enumerate(np.array_split(order, 3)):
        paths.append(root / f"device-{i}.npz")
        write_device_file(paths[-1], Dataset(noisy.X[rows], noisy.y[rows], 3, {}))
    permuted = Dataset(noisy.X[order[:150]], (noisy.y[order[:150]] + 1) % 3, 3, {})
    write_device_file(root / "permuted.npz", permuted)
    return FanWorld(root / "base.npz", paths, root / "permuted.npz")


class AgentProcess:
    def __init__(self, device_id: str, broker_url: str, data: Path, world: FanWorld, tmp: Path):
        self.device_id = device_id
        self.log_path = tmp / f"{device_id}.log"
        options = {
            "--device-id": device_id,
            "--broker": broker_url,
            "--data": str(data),
            "--base-model": str(world.base_model),
            "--state-dir": str(tmp / f"{device_id}-state"),
            "--heartbeat-seconds": "1",
            "--will-delay-seconds": "0",
            "--reconnect-max-seconds": "2",
            "--fetch-timeout-seconds": "15",
            "--power-profile": "generic",
        }
        argv = [*AGENT_COMMAND, *(item for pair in options.items() for item in pair)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=WAIT)
        self._log.close()


def make_config(
    broker_url: str,
    state_dir: Path,
    aggregate_in: AggregationRunner = AggregationRunner.ACTOR,
    **policy: object,
) -> CoordinatorConfig:
    knobs = {
        "max_concurrent_jobs": 3,
        "accuracy_threshold": None,
        "accuracy_drop_margin": None,
        "drift_threshold": None,
        "heartbeat_timeout_s": 10.0,
        "job_timeout_s": 30.0,
        "round_deadline_s": 60.0,
        "min_completion_ratio": 0.6,
        **policy,
    }
    return CoordinatorConfig(
        mqtt=parse_broker_url(broker_url, session_expiry_s=600, reconnect_max_delay_s=2),
        state_dir=state_dir,
        actor_name=f"fleet-{uuid.uuid4().hex[:8]}",  # one actor per test on the shared Ray
        metrics_addr="127.0.0.1",
        metrics_port=0,
        api_addr="127.0.0.1",
        api_port=0,
        policy=SchedulerPolicy(**knobs),
        rollout=RolloutPolicy(
            canary_fraction=1.0, max_accuracy_regression=0.05, canary_deadline_s=60.0
        ),
        # the A·B factors: this test also checks the exact-vs-naive gap, which needs factors
        finetune=FinetuneSettings(epochs=30, lr=0.02, method="skip2-lora"),
        federation=FederationPolicy(max_rounds=1),  # a run of one round: the mechanics
        command_timeout_s=30.0,
        tick_interval_s=0.2,
        metrics_interval_s=0.5,
        aggregate_in=aggregate_in,
    )


class Fleet:
    """A coordinator plus agents, and the API calls and waits the tests need."""

    def __init__(self, broker, world: FanWorld, tmp: Path):
        self.broker, self.world, self.tmp = broker, world, tmp
        self.state_dir = tmp / "coordinator"
        self.agents: dict[str, AgentProcess] = {}
        self.coordinator: Coordinator | None = None
        self.config: CoordinatorConfig | None = None

    def start_coordinator(self, **policy: object) -> Coordinator:
        if self.config is None or policy:
            self.config = make_config(self.broker.url, self.state_dir, **policy)
        self.coordinator = Coordinator.start(self.config)
        return self.coordinator

    def stop_coordinator(self) -> None:
        self.coordinator.stop()
        self.coordinator = None

    def start_agent(self, device_id: str, data: Path) -> AgentProcess:
        agent = AgentProcess(device_id, self.broker.url, data, self.world, self.tmp)
        self.agents[device_id] = agent
        return agent

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        api = ApiClient(
            f"http://127.0.0.1:{self.coordinator.api.port}", WAIT, self.config.token_path
        )
        return api.request(method, path, body)

    def get(self, path: str):
        status, payload = self.api("GET", path)
        assert status == 200, payload
        return payload

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.coordinator.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.read().decode()

    def wait_until(self, what: str, check: Callable[[], object], timeout: float = WAIT):
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = {
                    d: a.log_path.read_text(errors="replace")[-1500:]
                    for d, a in self.agents.items()
                }
                raise AssertionError(f"timed out waiting for {what}; agent logs: {logs}")
            time.sleep(0.1)

    def devices_online(self, *device_ids: str) -> None:
        def online() -> bool:
            devices = {d["device_id"]: d for d in self.get("/devices")}
            return all(
                d in devices and devices[d]["online"] and devices[d]["cohort"] for d in device_ids
            )

        self.wait_until(f"{device_ids} online", online)

    def round_in_stage(self, *stages: str, timeout: float = WAIT) -> dict:
        return self.wait_until(
            f"the round to reach {stages}",
            lambda: next((r for r in self.get("/rounds") if r["stage"] in stages), None),
            timeout,
        )

    def cohort(self) -> dict:
        return self.wait_until("an adapter", lambda: next(iter(self.get("/adapters")), None))

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.coordinator is not None:
            self.coordinator.stop()


@pytest.fixture
def fleet(ray_session, mosquitto, fan_world, tmp_path):
    fleet = Fleet(mosquitto, fan_world, tmp_path)
    yield fleet
    fleet.close()


def start_three(fleet: Fleet, **policy: object) -> list[str]:
    fleet.start_coordinator(**policy)
    names = ["dev-a", "dev-b", "dev-c"]
    for name, data in zip(names, fleet.world.device_data, strict=True):
        fleet.start_agent(name, data)
    fleet.devices_online(*names)
    return names


def answered_the_offer(fleet, version: int) -> list[dict] | None:
    """Every device, once each has installed or declined `version` (None until then)."""
    devices = fleet.get("/devices")
    settled = all(
        d["offered_version"] == version and d["offer_result"] in ("installed", "declined")
        for d in devices
    )
    return devices if devices and settled else None


def test_a_round_goes_from_trigger_to_an_adapter_offered_to_every_device(fleet):
    names = start_three(fleet)
    status, started = fleet.api("POST", "/finetune", {"all": True})
    assert status == 200 and started["rounds"][0]["devices"] == names

    stored = fleet.round_in_stage("STORED")
    assert stored["adapter_version"] == 1 and stored["algorithm"] == "coordinate-median"
    assert sorted(stored["weights"]) == names and stored["failures"] == {}
    assert len(stored["gap"]["relative_frobenius"]) == 3
    fleet.wait_until("v1 promoted", lambda: fleet.cohort()["current_version"] == 1)
    devices = fleet.wait_until("every device answered v1", lambda: answered_the_offer(fleet, 1))
    for device in devices:
        # each runs v1 or kept its own fine-tune, which measured better on its hold-out
        running = device["running"]
        if device["offer_result"] == "installed":
            assert running["version"] == 1 and running["origin"] == "fleet", device
        else:
            assert running["origin"] == "personal" and "declined" in running["why"], device
        assert device["accuracy_after"] > device["accuracy_before"], device
    kinds = {(j["kind"], j["state"]) for j in fleet.get("/jobs")}
    assert kinds == {
        ("finetune", "SUCCEEDED"),
        ("evaluate", "SUCCEEDED"),
        ("apply_adapter", "SUCCEEDED"),
    }

    expected = [
        'skipfleet_rounds_total{outcome="completed"} 1.0',
        'skipfleet_rollouts_total{outcome="promoted"} 1.0',
        f'skipfleet_adapter_version{{cohort="{fleet.cohort()["cohort"]}"}} 1.0',
        "skipfleet_devices_online 3.0",
    ]
    fleet.wait_until("the metrics", lambda: all(line in fleet.metrics() for line in expected))


def test_an_agent_killed_mid_round_does_not_stall_it(fleet):
    names = start_three(fleet, job_timeout_s=8.0, max_attempts=1)
    fleet.agents["dev-c"].signal(signal.SIGSTOP)  # still connected: it gets a job it never runs
    status, started = fleet.api("POST", "/finetune", {"all": True})
    assert status == 200 and started["rounds"][0]["devices"] == names
    fleet.wait_until(
        "dev-a and dev-b done",
        lambda: (
            {j["device_id"] for j in fleet.get("/jobs") if j["state"] == "SUCCEEDED"}
            >= {"dev-a", "dev-b"}
        ),
    )
    fleet.agents["dev-c"].signal(signal.SIGKILL)
    stored = fleet.round_in_stage("STORED", "FAILED")
    assert stored["stage"] == "STORED", stored
    assert sorted(stored["answered"]) == ["dev-a", "dev-b"]
    assert "TIMED_OUT" in stored["failures"]["dev-c"]
    fleet.wait_until(
        "dev-c offline",
        lambda: not next(d for d in fleet.get("/devices") if d["device_id"] == "dev-c")["online"],
    )


def test_the_coordinator_restarted_mid_fleet_recovers_its_state(fleet, ray_session):
    start_three(fleet)
    fleet.agents["dev-c"].signal(signal.SIGSTOP)  # keeps the round open across the restarts
    fleet.api("POST", "/finetune", {"all": True})
    fleet.wait_until(
        "two answers",
        lambda: len([j for j in fleet.get("/jobs") if j["state"] == "SUCCEEDED"]) == 2,
    )
    first_pid = fleet.get("/health")["pid"]
    ray_session.kill(fleet.coordinator.actor, no_restart=False)  # a crash: Ray restarts it
    fleet.wait_until("a restarted actor", lambda: _health_pid(fleet) not in (None, first_pid))
    assert fleet.get("/rounds")[0]["stage"] == "RUNNING"

    fleet.stop_coordinator()  # and the whole coordinator, while the fleet goes on
    fleet.agents["dev-c"].signal(signal.SIGCONT)
    fleet.start_coordinator()
    stored = fleet.round_in_stage("STORED")
    assert sorted(stored["answered"]) == ["dev-a", "dev-b", "dev-c"]
    fleet.wait_until("v1 promoted", lambda: fleet.cohort()["current_version"] == 1)
    assert {d["device_id"] for d in fleet.get("/devices")} == {"dev-a", "dev-b", "dev-c"}


def _health_pid(fleet: Fleet) -> int | None:
    status, payload = fleet.api("GET", "/health")
    return payload.get("pid") if status == 200 else None


def test_a_canary_that_regresses_is_rolled_back_with_the_round_aggregated_by_a_ray_task(fleet):
    fleet.start_coordinator(aggregate_in=AggregationRunner.TASK)
    fleet.start_agent("dev-wrong", fleet.world.permuted_data)  # learns shifted labels
    fleet.start_agent("dev-good", fleet.world.device_data[0])
    fleet.devices_online("dev-wrong", "dev-good")
    status, _ = fleet.api("POST", "/finetune", {"devices": ["dev-wrong"]})
    assert status == 200
    fleet.round_in_stage("STORED")
    rollout = fleet.wait_until(
        "the canary's verdict",
        lambda: next((r for r in fleet.cohort()["rollouts"] if r["state"] != "CANARY"), None),
    )
    assert rollout["state"] == "ROLLED_BACK", rollout
    assert set(rollout["canary_devices"]) == {"dev-good", "dev-wrong"}
    assert fleet.cohort()["current_version"] is None
    assert not [j for j in fleet.get("/jobs") if j["kind"] == "apply_adapter"]
    assert all(d["adapter_version"] is None for d in fleet.get("/devices"))


def test_the_cli_serves_until_sigterm_and_status_prints_the_fleet(
    ray_session, mosquitto, fan_world, tmp_path
):
    """`skipfleet coordinator` as a process, joining the session's Ray rather than starting one."""
    from tests.mqtt_broker import free_port

    api_port, metrics_port = free_port(), free_port()
    actor_name = f"cli-{uuid.uuid4().hex[:8]}"
    argv = [
        *COORDINATOR_COMMAND,
        *("--broker", mosquitto.url, "--state-dir", str(tmp_path / "state")),
        *("--ray-address", ray_session.get_runtime_context().gcs_address),
        *("--ray-namespace", "skipfleet-tests", "--actor-name", actor_name),
        *("--api-addr", "127.0.0.1", "--api-port", str(api_port)),
        *("--metrics-addr", "127.0.0.1", "--metrics-port", str(metrics_port)),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "coordinator.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    agent = AgentProcess("dev-a", mosquitto.url, fan_world.device_data[0], fan_world, tmp_path)
    try:
        deadline = time.monotonic() + WAIT

        def table() -> str:
            status = subprocess.run(
                [*STATUS_COMMAND, "--api", f"http://127.0.0.1:{api_port}"],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=WAIT,
            )  # fmt: skip
            return status.stdout if status.returncode == 0 else ""

        while "dev-a" not in (output := table()):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert output.split("\n")[1].split()[:2] == ["dev-a", "yes"]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert b"skipfleet_devices_known" in response.read()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=WAIT) == 0, log_path.read_text()
        with pytest.raises(ValueError):
            ray_session.get_actor(actor_name, namespace="skipfleet-tests")
    finally:
        agent.stop()
        if process.poll() is None:
            process.kill()
            process.wait()
