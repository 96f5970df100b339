"""The compose fleet (docker-compose.yml) as local processes, without a Docker engine.

Each service runs from the compose file's own pieces, with only container paths, host names and
ports mapped to this machine:
- mosquitto: deploy/mosquitto/mosquitto.conf and its ACL, accounts made by make-accounts.sh;
- the coordinator: the compose command (`--username coordinator --password-file ...`), joined to
  the session's Ray instead of a head node of its own;
- agents: replica n runs deploy/agent-entrypoint.sh as container `skipfleet-agent-n` with the
  compose environment, so it becomes `device-(n-1)` with its own account and shard, from a fleet
  made by `skipfleet prepare`;
- Prometheus: deploy/prometheus/prometheus.yml, its target rewritten.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from shared.protocol import Presence, PresenceState, encode
from skipfleet.prepare import prepare
from skipfleet.processes import child_env
from tests.topology import (
    DEPLOY,
    SERVICES,
    DeployBroker,
    LoggedProcess,
    Mqtt,
    compose_flags,
    devices_reachable,
    make_accounts,
    run_one_round,
    session_coordinator_flags,
    wait_until,
)

pytestmark = pytest.mark.slow

N_DEVICES = 3
DEVICE_IDS = [f"device-{k}" for k in range(N_DEVICES)]  # what make-accounts.sh names them
# After the compose command (argparse: the last value wins): every state change shows in seconds.
FAST_AGENT = (
    "--heartbeat-seconds", "1", "--will-delay-seconds", "0", "--reconnect-max-seconds", "2",
    "--power-profile", "generic",
)  # fmt: skip


@pytest.fixture(scope="module")
def fleet_dir(data_dir, tmp_path_factory) -> Path:
    """What `skipfleet prepare --dataset fan --devices 3` writes: base.npz, shards/shard-K.npz."""
    out = tmp_path_factory.mktemp("fleet")
    prepare("fan", N_DEVICES, data_dir, out, drift=False, seed=0, log=lambda _: None)
    return out


class Secrets(NamedTuple):
    directory: Path  # deploy/secrets as make-accounts.sh writes it
    passwords: dict[str, str]  # by user name


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> Secrets:
    directory = tmp_path_factory.mktemp("deploy") / "secrets"
    return Secrets(directory, make_accounts(N_DEVICES, directory))


@pytest.fixture(scope="module")
def broker(secrets, tmp_path_factory) -> Iterator[DeployBroker]:
    broker = DeployBroker(
        tmp_path_factory.mktemp("mosquitto"), secrets.directory / "mosquitto_passwd"
    )
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def coordinator_flags(ray_session, broker, secrets, tmp_path_factory) -> dict[str, str]:
    """The compose coordinator's command with this host's broker, secret, Ray and ports."""
    compose = compose_flags("coordinator")
    local = {
        **session_coordinator_flags(ray_session, tmp_path_factory.mktemp("coordinator") / "state"),
        "broker": broker.url,
        "password-file": str(secrets.directory / "coordinator_password"),
    }
    # Everything tied to the container is replaced; the account is the compose one.
    assert set(compose) - set(local) == {"username"}, compose
    assert compose["username"] == "coordinator"
    return {**compose, **local}


def agent_environment(broker: DeployBroker, secrets: Secrets, fleet_dir: Path) -> dict[str, str]:
    """The compose agent's environment, its container paths and broker mapped to this host."""
    host = {"mqtt://mosquitto:1883": broker.url, "/run/secrets/": f"{secrets.directory}/",
            "/data/fleet": str(fleet_dir)}  # fmt: skip
    environment = {}
    for name, value in SERVICES["agent"]["environment"].items():
        for container, local in host.items():
            value = str(value).replace(container, local)
        environment[name] = value
    return environment


@pytest.fixture(scope="module")
def agents(
    broker, secrets, fleet_dir, coordinator, tmp_path_factory
) -> Iterator[list[LoggedProcess]]:
    """Replicas 1..N of the agent service, once every device is reachable."""
    root = tmp_path_factory.mktemp("agents")
    (root / "bin").mkdir()
    shim = root / "bin" / "skipfleet"  # the image's `skipfleet`: this source tree
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m skipfleet.cli "$@"\n')
    shim.chmod(0o755)
    compose = agent_environment(broker, secrets, fleet_dir)
    agents = []
    for n in range(1, N_DEVICES + 1):
        container = root / f"skipfleet-agent-{n}"  # its tmpfs /run/skipfleet
        container.mkdir()
        env = child_env(
            **compose,
            PATH=f"{root / 'bin'}:{os.environ['PATH']}",
            HOSTNAME=f"skipfleet-agent-{n}",  # how the entrypoint tells which replica it is
            SKIPFLEET_STATE_ROOT=str(root / "agent-state"),  # the shared agent-state volume
            SKIPFLEET_RUNTIME_DIR=str(container),
            SKIPFLEET_HEALTH_FILE=str(container / "health"),  # set by deploy/agent.Dockerfile
        )
        argv = ["bash", str(DEPLOY / "agent-entrypoint.sh"), *SERVICES["agent"]["command"],
                *FAST_AGENT]  # fmt: skip
        agents.append(LoggedProcess(container.name, argv, container / "agent.log", env))
    try:
        wait_until("every device reachable", lambda: devices_reachable(coordinator, DEVICE_IDS),
                   watch=[coordinator, *agents])  # fmt: skip
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def test_every_device_comes_online_through_the_acl_broker(coordinator, agents):
    devices = coordinator.get("/devices")
    assert sorted(d["device_id"] for d in devices) == DEVICE_IDS
    assert all(d["online"] for d in devices)
    assert len({d["cohort"] for d in devices}) == 1  # same task, same base model
    # Each agent container's compose healthcheck passes: the agent keeps its health file fresh.
    (script,) = SERVICES["agent"]["healthcheck"]["test"][1:]
    max_age = SERVICES["agent"]["environment"]["SKIPFLEET_HEALTH_MAX_AGE_SECONDS"]
    for agent in agents:
        env = {"PATH": os.environ["PATH"], "SKIPFLEET_HEALTH_MAX_AGE_SECONDS": max_age,
               "SKIPFLEET_HEALTH_FILE": str(agent.log_path.parent / "health")}  # fmt: skip
        result = subprocess.run(["bash", str(DEPLOY / script)], env=env, capture_output=True,
                                text=True, timeout=30)  # fmt: skip
        assert result.returncode == 0, (agent.name, result.stdout, result.stderr)


def test_a_round_triggered_through_the_api_runs_on_every_device(coordinator, agents):
    cohort = run_one_round(coordinator, DEVICE_IDS, watch=agents)
    assert cohort["current_version"] in cohort["current_versions"].values()
    (stored,) = coordinator.get("/rounds")
    assert sorted(stored["answered"]) == DEVICE_IDS and stored["failures"] == {}, stored


def test_prometheus_counts_every_device_online(prometheus, agents):
    wait_until(
        "Prometheus: skipfleet_devices_online == 3",
        lambda: prometheus.query(f"skipfleet_devices_online == {N_DEVICES}"),
        watch=[prometheus],
    )


def test_a_device_account_cannot_speak_for_another_device(broker, secrets, coordinator, agents):
    accounts = secrets.passwords
    watcher = Mqtt(broker.port, "acl-watcher", "coordinator", accounts["coordinator"])
    forger = Mqtt(broker.port, "device-0-forger", "device-0", accounts["device-0"])
    try:
        assert not watcher.connect().is_failure and not forger.connect().is_failure
        assert not watcher.subscribe("fleet/#").is_failure
        # device-0 announces, as device-1 (a well-formed message), that device-1 went offline.
        lie = Presence(PresenceState.OFFLINE, "forged", "0", "0" * 64, "default")
        forged = encode(lie, sender="device-1", boot_id="forged", seq=0)
        ack = forger.publish("fleet/device-1/status", forged, retain=True)
        assert ack.is_failure and str(ack) == "Not authorized"
        # Its own topic still works: once this has arrived, the lie would have too (one client's
        # messages reach a subscriber in order).
        assert not forger.publish("fleet/device-0/telemetry", b"marker").is_failure
        seen = []

        def marker_arrived() -> bool:
            seen.extend(watcher.received(0.2))
            return any(m.payload == b"marker" for m in seen)

        wait_until("the marker", marker_arrived)
        assert not [m for m in seen if m.payload == forged]
    finally:
        watcher.close()
        forger.close()
    device1 = coordinator.get("/devices/device-1")
    assert device1["online"], device1
