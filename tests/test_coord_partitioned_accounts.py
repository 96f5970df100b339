"""A 2-partition coordinator on the compose broker (deploy/mosquitto config, ACL and accounts
made by `make-accounts.sh --partitions 2`, a real mosquitto), each partition on its own account
(`coordinator-pI`, password from `coordinator_password-pI`): real agents on their device
accounts in a cohort per partition, a round per cohort, and not one client-id takeover.
A partition password file that is missing stops the coordinator at start-up, naming it.

The coordinator is the real `skipfleet coordinator`, joined to the session's Ray.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

from skipfleet.coordinator_process import CoordinatorProcess
from skipfleet.processes import REPO, AgentProcess, child_env
from tests.test_account_fight_broker import TAKEOVER_LINE
from tests.test_coord_partitioned import cohort_per_partition, run_a_round_per_cohort, world
from tests.topology import DeployBroker, make_accounts

pytestmark = pytest.mark.slow

__all__ = ["world"]  # the module fixture, shared with test_coord_partitioned

AGENT_OPTIONS = ["--heartbeat-seconds", "1", "--keepalive-seconds", "10",
                 "--reconnect-max-seconds", "2", "--power-profile", "generic"]  # fmt: skip


@dataclass
class Cohort:
    device_ids: list[str]


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    root = tmp_path_factory.mktemp("partition-accounts")
    passwords = make_accounts(4, root / "secrets", partitions={"coordinator": 2})
    broker = DeployBroker(root / "broker", root / "secrets" / "mosquitto_passwd")
    yield broker, passwords, root / "secrets"
    broker.stop()


def coordinator_argv(ray_session, secrets, partitions: int) -> list[str]:
    return [
        "--ray-address", ray_session.get_runtime_context().gcs_address,
        "--ray-namespace", "skipfleet-tests", "--instance", f"acct-{uuid.uuid4().hex[:6]}",
        "--partitions", str(partitions),
        "--username", "coordinator", "--password-file", str(secrets / "coordinator_password"),
        "--accuracy-threshold", "off", "--accuracy-drop-margin", "off", "--max-rounds", "1",
        "--canary-fraction", "1.0", "--tick-seconds", "0.2", "--epochs", "5",
    ]  # fmt: skip


def start_agents(broker, passwords, world, work, cohorts) -> list[AgentProcess]:
    agents = []
    for k in range(4):
        name = f"device-{k}"
        secret = work / f"{name}.password"
        secret.write_text(passwords[name])
        cohort = cohorts[k % 2][0]
        options = (*AGENT_OPTIONS, "--cohort", cohort, "--username", name,
                   "--password-file", str(secret))  # fmt: skip
        agents.append(AgentProcess(
            name, broker.url, world / "device.npz", world / "base.npz",
            work / f"{name}-state", work / f"{name}.log", options,
        ))  # fmt: skip
    return agents


def test_two_partitions_on_their_own_accounts_run_a_round_each_with_no_takeover(
    deploy, ray_session, world, tmp_path
):
    broker, passwords, secrets = deploy
    cohorts = cohort_per_partition(world / "base.npz")
    before = broker.log().count(TAKEOVER_LINE)
    coordinator = CoordinatorProcess(broker.url, tmp_path / "state", tmp_path / "coordinator.log",
                                     coordinator_argv(ray_session, secrets, 2))  # fmt: skip
    agents: list[AgentProcess] = []
    try:
        coordinator.wait_healthy(90)
        agents = start_agents(broker, passwords, world, tmp_path, cohorts)
        members = [Cohort([a.device_id for a in agents[i::2]]) for i in range(2)]
        partitions = run_a_round_per_cohort(coordinator.api, cohorts, members)
        assert [p["mqtt_connected"] for p in partitions] == [True, True]
        assert broker.log().count(TAKEOVER_LINE) == before  # 0 client-id takeovers
        log = broker.log()
        for index in range(2):  # the broker saw each partition on its own account
            assert f"u'coordinator-p{index}'" in log, index
        assert "u'coordinator')" not in log  # and nobody on the coordinator's own
    finally:
        for agent in agents:
            agent.stop()
        assert coordinator.stop() == 0, coordinator.tail()


def test_a_missing_partition_password_file_stops_the_coordinator_at_start_up_naming_it(
    deploy, ray_session, tmp_path
):
    _, _, secrets = deploy
    result = subprocess.run(
        [sys.executable, "-m", "skipfleet.cli", "coordinator", "--broker", "mqtt://127.0.0.1:1",
         "--state-dir", str(tmp_path / "state"), *coordinator_argv(ray_session, secrets, 3)],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 64, result.stderr[-3000:]
    assert f"{secrets}/coordinator_password-p2: cannot read the MQTT password" in result.stderr
    assert "connects as coordinator-p2" in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything was made
