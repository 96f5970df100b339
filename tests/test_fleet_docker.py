"""The Docker backend: device ids, the no-engine message, and the verbs on a fake engine.

Here the verbs run against a small in-memory stand-in of the SDK's objects, which checks our side
of the calls (what is disconnected, recorded, reconnected, cloned), not Docker's. Every verb also
runs on the real engine, on the compose fleet's containers, in tests/test_compose_fleet.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from skipfleet.cli import main as skipfleet
from skipfleet.fleet.base import CutMode, DeviceState, FleetUnavailable, UnknownDevice, Unsupported
from skipfleet.fleet.docker_backend import (
    NUMBER_LABEL,
    PROJECT_LABEL,
    SERVICE_LABEL,
    DockerFleet,
    clone_config,
    connect_engine,
    device_id_for,
)

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = REPO / "deploy" / "agent-entrypoint.sh"
NETWORK = "skipfleet_default"


# -- device ids ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "env", "device_id"),
    [
        ("skipfleet-agent-1", (), "device-0"),
        ("skipfleet_agent_3", (), "device-2"),  # compose v1 names
        ("other-agent-012", (), "device-11"),
        ("skipfleet-agent-2", ("SKIPFLEET_DEVICE_ID=pi-07",), "pi-07"),  # the variable wins
        ("skipfleet-agent-2", ("SKIPFLEET_DEVICE_ID=",), "device-1"),  # empty: not set
        ("Kitchen_Pi.local", (), "kitchen-pi-local"),
        ("--Weird__Name--", (), "weird-name"),
        ("a" * 80, (), "a" * 64),
    ],
)
def test_device_ids_follow_the_entrypoint(name, env, device_id):
    assert device_id_for(name, env) == device_id


HOSTNAMES = ["Kitchen_Pi.local", "--Weird__Name--", "ÄÖ-ü 12", "x" * 70, "abc123def456", "A.B"]


def test_the_sanitising_rule_is_the_entrypoint_s(tmp_path):
    """Cross-check against the shell function itself: a missing or renamed one fails, so the
    Python rule cannot drift from the shipped entrypoint unnoticed."""
    match = re.search(r"^sanitize\(\) \{\n.*?^\}\n", ENTRYPOINT.read_text(), re.S | re.M)
    assert match is not None, f"no sanitize() function in {ENTRYPOINT}: update this test with it"
    script = "shopt -s extglob\n" + match.group(0) + 'for h in "$@"; do sanitize "$h"; done\n'
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    argv = ["bash", "-c", script, "bash", *HOSTNAMES]
    result = subprocess.run(argv, capture_output=True, text=True, check=True, env=env)
    assert result.stdout.splitlines() == [device_id_for(h) for h in HOSTNAMES]


# -- no engine -------------------------------------------------------------------------------
def test_no_engine_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    with pytest.raises(FleetUnavailable) as error:
        DockerFleet()
    message = str(error.value)
    assert f"no Docker engine answers at unix://{tmp_path}/docker.sock" in message
    assert "--control URL or --run-dir DIR" in message


def test_an_engine_that_does_not_ping_is_unavailable():
    class Client:
        def ping(self):
            raise ConnectionRefusedError("refused")

    with pytest.raises(FleetUnavailable, match=r"no Docker engine answers at .*refused"):
        connect_engine(from_env=Client)


def test_cli_without_an_engine_exits_3(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
    assert skipfleet(["fleet", "--docker", "ls"]) == 3
    assert "no Docker engine answers" in capsys.readouterr().err


# -- cloning -----------------------------------------------------------------------------------
def inspect_data(name: str, number: int, service: str = "agent", env=()) -> dict:
    labels = {
        PROJECT_LABEL: "skipfleet",
        SERVICE_LABEL: service,
        NUMBER_LABEL: str(number),
        "com.docker.compose.config-hash": "abc",
    }
    config = {
        "Hostname": "0123456789ab",
        "MacAddress": "02:42:ac:11:00:02",
        "Image": "skipfleet-agent:dev",
        "Cmd": ["--heartbeat-seconds", "10"],
        "Env": list(env),
        "Labels": labels,
    }
    mount = {"Type": "volume", "Source": "skipfleet_agent-state", "Target": "/var/lib/skipfleet"}
    host = {"Init": True, "Memory": 2**29, "Tmpfs": {"/run/skipfleet": ""}, "Mounts": [mount]}
    return {
        "Config": config,
        "HostConfig": host,
        "State": {"Pid": 4000 + number, "StartedAt": "2024-05-01T10:00:00.123456789Z"},
        "NetworkSettings": {"Networks": {NETWORK: {"Aliases": [name, service]}}},
    }


def test_clone_config_copies_the_template_under_a_new_number():
    attrs = inspect_data("skipfleet-agent-1", 1)
    body = clone_config(attrs, 5, {NETWORK: ["agent"]})
    assert "Hostname" not in body and "MacAddress" not in body  # the engine picks new ones
    assert body["Labels"][NUMBER_LABEL] == "5"
    assert body["Labels"]["com.docker.compose.config-hash"] == "abc"
    assert body["HostConfig"] == attrs["HostConfig"] and body["Cmd"] == attrs["Config"]["Cmd"]
    assert body["NetworkingConfig"] == {"EndpointsConfig": {NETWORK: {"Aliases": ["agent"]}}}
    assert attrs["Config"]["Labels"][NUMBER_LABEL] == "1", "the template is not modified"


# -- the verbs on a stand-in engine ----------------------------------------------------------
class FakeContainer:
    def __init__(self, engine: FakeEngine, name: str, attrs: dict) -> None:
        self.engine, self.name, self.attrs = engine, name, attrs
        self.id = f"id-{name}"
        self.status = "running"

    @property
    def labels(self) -> dict:
        return self.attrs["Config"]["Labels"]

    def reload(self) -> None:
        pass

    def pause(self) -> None:
        self.status = "paused"

    def unpause(self) -> None:
        self.status = "running"

    def kill(self) -> None:
        assert self.status == "running", "the engine refuses to kill a paused container"
        self.status = "exited"
        self.engine.killed_by_engine.append(self.name)

    def exec_run(self, cmd: list[str]) -> None:
        assert self.status == "running", "the engine refuses to exec in a paused container"
        self.engine.execs.append((self.name, cmd))
        if cmd == ["sh", "-c", "kill -KILL -1"] and self.attrs["HostConfig"].get("Init"):
            self.status = "exited"  # the init exits with the agent; no restart policy here

    def restart(self, timeout: int) -> None:
        self.status = "running"

    def stop(self, timeout: int) -> None:
        self.status = "exited"

    def start(self) -> None:
        self.status = "running"

    def remove(self) -> None:
        self.engine.all.remove(self)

    def stats(self, stream: bool, one_shot: bool) -> dict:
        return {"memory_stats": {"usage": 50 * 2**20, "stats": {"inactive_file": 2**20}}}


class FakeNetwork:
    def __init__(self, name: str) -> None:
        self.name = name

    def disconnect(self, container: FakeContainer) -> None:
        del container.attrs["NetworkSettings"]["Networks"][self.name]

    def connect(self, container: FakeContainer, aliases: list[str] | None = None) -> None:
        container.attrs["NetworkSettings"]["Networks"][self.name] = {"Aliases": aliases}


class FakeEngine:
    """Just the parts of docker.DockerClient that DockerFleet calls."""

    def __init__(self) -> None:
        self.all: list[FakeContainer] = []
        self.containers = FakeContainers(self)
        self.networks = FakeNetworks()
        self.api = self
        self.killed_by_engine: list[str] = []
        self.execs: list[tuple[str, list[str]]] = []

    def add(self, name: str, number: int, service: str = "agent", env=()) -> FakeContainer:
        container = FakeContainer(self, name, inspect_data(name, number, service, env))
        self.all.append(container)
        return container

    def create_container_from_config(self, body: dict, name: str) -> dict:
        config = {k: v for k, v in body.items() if k not in ("HostConfig", "NetworkingConfig")}
        endpoints = body["NetworkingConfig"]["EndpointsConfig"]
        attrs = {"Config": config, "HostConfig": body["HostConfig"], "State": {"Pid": 0},
                 "NetworkSettings": {"Networks": dict(endpoints)}}  # fmt: skip
        container = FakeContainer(self, name, attrs)
        container.status = "created"
        self.all.append(container)
        return {"Id": container.id}


class FakeContainers:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    def list(self, all: bool, filters: dict) -> list[FakeContainer]:
        wanted = dict(label.split("=", 1) for label in filters["label"])
        return [c for c in self.engine.all if wanted.items() <= c.labels.items()]

    def get(self, container_id: str) -> FakeContainer:
        return next(c for c in self.engine.all if c.id == container_id)


class FakeNetworks:
    def list(self, filters: dict) -> list[FakeNetwork]:
        return [FakeNetwork(NETWORK)]

    def get(self, name: str) -> FakeNetwork:
        return FakeNetwork(name)


@pytest.fixture
def engine() -> FakeEngine:
    engine = FakeEngine()
    engine.add("skipfleet-mosquitto-1", 1, service="mosquitto")
    for number in (1, 2, 3):
        engine.add(f"skipfleet-agent-{number}", number)
    return engine


@pytest.fixture
def docker_fleet(engine, tmp_path) -> DockerFleet:
    return DockerFleet(client=engine, cuts_path=tmp_path / "cuts.json")


def test_devices_are_the_agent_containers(docker_fleet):
    rows = docker_fleet.devices()
    assert [r.device_id for r in rows] == ["device-0", "device-1", "device-2"]
    assert rows[0].pid == 4001 and rows[0].rss_bytes == 49 * 2**20 and rows[0].uptime_s > 0
    assert rows[0].state is DeviceState.RUNNING and "skipfleet-agent-1" in rows[0].detail
    with pytest.raises(UnknownDevice, match="device-0, device-1, device-2"):
        docker_fleet.kill("device-9")


def test_pause_kill_restart(docker_fleet, engine):
    assert docker_fleet.pause("device-1").state is DeviceState.PAUSED
    assert docker_fleet.kill("device-1").state is DeviceState.DEAD  # unpaused first
    assert docker_fleet.restart("device-1").state is DeviceState.RUNNING
    # Killed from inside, as a crash: the engine's kill would suspend the restart policy.
    assert engine.execs == [("skipfleet-agent-2", ["sh", "-c", "kill -KILL -1"])]
    assert engine.killed_by_engine == []


def test_kill_without_an_init_goes_through_the_engine(docker_fleet, engine):
    # The agent is PID 1 then, which ignores SIGKILL from inside its own namespace.
    engine.all[1].attrs["HostConfig"]["Init"] = False
    assert docker_fleet.kill("device-0").state is DeviceState.DEAD
    assert engine.killed_by_engine == ["skipfleet-agent-1"] and engine.execs == []


def test_cut_records_networks_and_restore_reconnects_with_aliases(docker_fleet, engine, tmp_path):
    broker = engine.all[0]
    rows = docker_fleet.cut_broker()
    assert broker.attrs["NetworkSettings"]["Networks"] == {}
    assert (tmp_path / "cuts.json").exists()
    # A second invocation (another `skipfleet fleet` process) finds the record and restores it.
    again = DockerFleet(client=engine, cuts_path=tmp_path / "cuts.json")
    again.restore_broker()
    aliases = broker.attrs["NetworkSettings"]["Networks"][NETWORK]["Aliases"]
    assert aliases == ["skipfleet-mosquitto-1", "mosquitto"]  # `mosquitto` resolves again
    assert [r.state for r in rows] == [DeviceState.RUNNING] * 3  # agents themselves run on
    assert docker_fleet.cut("device-2").state is DeviceState.CUT
    assert docker_fleet.restore("device-2").state is DeviceState.RUNNING
    with pytest.raises(Unsupported, match="blackhole"):
        docker_fleet.cut("device-2", CutMode.REFUSE)


def test_scale_clones_and_removes_the_highest_numbered(docker_fleet, engine):
    rows = docker_fleet.scale(5)
    assert [r.device_id for r in rows] == [f"device-{i}" for i in range(5)]
    clone = engine.all[-1]
    assert clone.name == "skipfleet-agent-5" and clone.status == "running"
    assert clone.attrs["NetworkSettings"]["Networks"] == {NETWORK: {"Aliases": ["agent"]}}
    rows = docker_fleet.scale(2)
    assert [r.device_id for r in rows] == ["device-0", "device-1"]
    docker_fleet.scale(0)
    with pytest.raises(Unsupported, match="no agent container to clone"):
        docker_fleet.scale(1)
