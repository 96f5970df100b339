"""One coordinator per instance: its own MQTT client id and Ray actor, derived from its state dir
(or --instance); a second one refuses to start and leaves the first alone; a coordinator whose
MQTT session another client takes over stops instead of fighting for it."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

import pytest

from coordinator import cli
from coordinator.bridge import SESSION_TAKEN_OVER, FatalReason, MqttBridge
from coordinator.config import ConfigError, from_args
from coordinator.instance import InstanceConflict, StateDirLock
from coordinator.metrics import FleetMetrics
from coordinator.ports import LocalFleetPort
from coordinator.ray_runtime import ActorOwnedElsewhere, release_actor, start_actor
from coordinator.service import FleetService
from shared.mqtt import parse_broker_url
from skipfleet.processes import REPO, child_env
from tests.coord_fleet_helpers import make_config
from tests.fake_mqtt_server import FakeMqttServer

WAIT = 30.0


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args(list(argv))


def test_the_client_id_and_actor_name_derive_from_the_state_dir(tmp_path, monkeypatch):
    one = from_args(parse("--state-dir", str(tmp_path / "one")), {})
    other = from_args(parse("--state-dir", str(tmp_path / "other")), {})
    assert one.client_id.startswith("skipfleet-coordinator-") and len(one.instance_name) == 10
    assert one.client_id != other.client_id and one.fleet_actor_name != other.fleet_actor_name
    monkeypatch.chdir(tmp_path)
    relative = from_args(parse("--state-dir", "one"), {})
    assert relative.client_id == one.client_id  # the absolute path, however it was written


def test_an_instance_name_overrides_the_derived_one(tmp_path):
    config = from_args(parse("--state-dir", str(tmp_path), "--instance", "site-b"), {})
    assert config.client_id == "skipfleet-coordinator-site-b"
    assert config.fleet_actor_name == "skipfleet-coordinator-site-b"
    with pytest.raises(ConfigError, match="--instance"):
        from_args(parse("--state-dir", str(tmp_path), "--instance", "Site/B"), {})


def test_the_api_and_metrics_bind_loopback_and_the_token_has_a_home(tmp_path):
    config = from_args(parse("--state-dir", str(tmp_path)), {})
    assert (config.api_addr, config.metrics_addr) == ("127.0.0.1", "127.0.0.1")
    assert config.token_path == tmp_path / "api-token"
    from_env = from_args(
        parse("--state-dir", str(tmp_path)), {"SKIPFLEET_API_TOKEN_FILE": "/etc/x/token"}
    )
    assert str(from_env.token_path) == "/etc/x/token"
    flag = parse("--state-dir", str(tmp_path), "--api-token-file", "/run/t", "--api-addr", "::")
    assert str(from_args(flag, {}).token_path) == "/run/t"


def test_a_state_dir_has_one_coordinator_at_a_time(tmp_path):
    first = StateDirLock.acquire(tmp_path / "state")
    with pytest.raises(InstanceConflict, match=f"pid {os.getpid()}"):
        StateDirLock.acquire(tmp_path / "state")
    first.release()
    StateDirLock.acquire(tmp_path / "state").release()


def test_a_state_dir_the_coordinator_makes_is_its_owners_alone_and_an_existing_one_is_kept(
    tmp_path, caplog
):
    old = os.umask(0o022)  # the common umask: a plain mkdir would make it 0755
    try:
        cli.prepare_state_dir(tmp_path / "new" / "state")
        StateDirLock.acquire(tmp_path / "locked" / "state").release()
        group, everyone = tmp_path / "group", tmp_path / "everyone"
        group.mkdir(mode=0o750)  # as the images make it
        everyone.mkdir(mode=0o755)
        cli.prepare_state_dir(group)
        cli.prepare_state_dir(everyone)
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "locked" / "state").stat().st_mode & 0o777 == 0o700
    assert group.stat().st_mode & 0o777 == 0o750  # the operator's choice
    assert everyone.stat().st_mode & 0o777 == 0o755  # kept too, with a warning
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"the state dir {everyone} is mode 0755: every user" in warning


# -- Ray: the fleet actor is never adopted, never killed by another coordinator ------------------
@pytest.mark.slow
def test_a_second_coordinator_of_an_instance_refuses_and_the_first_lives_on(ray_session, tmp_path):
    config = dataclasses.replace(make_config(tmp_path / "a"), instance="refuse-test")
    actor = start_actor(config)
    try:
        assert ray_session.get(actor.health.remote(), timeout=WAIT)["status"] == "ok"
        # another state dir, another topic root, the same instance: the old bug fed this actor
        # the other fleet's devices and ray.kill'ed it on exit
        intruder = dataclasses.replace(
            make_config(tmp_path / "b"), instance="refuse-test", topic_root="elsewhere"
        )
        with pytest.raises(ActorOwnedElsewhere, match="already running"):
            start_actor(intruder)
        assert ray_session.get(actor.health.remote(), timeout=WAIT)["status"] == "ok"
    finally:
        release_actor(actor, config)


@pytest.mark.slow
def test_a_coordinator_restarted_right_after_stopping_gets_a_live_actor(ray_session, tmp_path):
    """The cause of the flaky restart test: get_if_exists found the actor ray.kill was ending."""
    config = dataclasses.replace(make_config(tmp_path), instance="restart-test")
    for _ in range(4):
        actor = start_actor(config)
        health = ray_session.get(actor.health.remote(), timeout=WAIT)
        assert health["status"] == "ok"
        ray_session.get(actor.close.remote(), timeout=WAIT)
        release_actor(actor, config)
        with pytest.raises(ValueError):  # the name is free again when stop() returns
            ray_session.get_actor(config.fleet_actor_name, namespace=config.ray_namespace)


@pytest.mark.slow
def test_the_cli_exits_75_when_its_state_dir_is_taken(ray_session, tmp_path):
    state = tmp_path / "state"
    lock = StateDirLock.acquire(state)  # a coordinator already runs on it
    try:
        result = subprocess.run(
            [sys.executable, "-m", "skipfleet.cli", "coordinator", "--state-dir", str(state),
             "--ray-address", ray_session.get_runtime_context().gcs_address,
             "--ray-namespace", "skipfleet-tests", "--api-port", "0", "--metrics-port", "0"],
            capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=120,
        )  # fmt: skip
    finally:
        lock.release()
    assert result.returncode == 75, result.stderr[-2000:]
    assert "another coordinator" in result.stderr and str(state) in result.stderr


# -- MQTT: a session taken over ends the coordinator, it does not fight back -------------------
# mosquitto 2.0.11 (Debian 12) only closes a taken-over connection, which looks like a network
# loss; the standard's DISCONNECT 0x8E comes from a fake server that sends just that.
SERVER_SHUTTING_DOWN = 0x8B  # a disconnect the bridge must ride out by reconnecting


def run_bridge_until_disconnected(server: FakeMqttServer, tmp_path):
    """A bridge on the fake server, until the server has sent its DISCONNECT and the bridge has
    reconnected (it would within its 1-2 s backoff; 5 s at most). What it reported as fatal."""
    settings = parse_broker_url(server.url, session_expiry_s=60, reconnect_max_delay_s=2)
    config = dataclasses.replace(
        make_config(tmp_path / "state"), mqtt=settings, instance="takeover-test"
    )
    service = FleetService(config)
    fatal: list[tuple[FatalReason, str]] = []
    bridge = MqttBridge(
        config, LocalFleetPort(service), FleetMetrics(), on_fatal=lambda *a: fatal.append(a)
    )
    try:
        bridge.start()
        assert server.disconnect_sent.wait(WAIT), "the bridge never connected and subscribed"
        deadline = time.monotonic() + 5.0
        # the second TCP connection comes before its CONNACK: wait for the bridge to say so too
        while time.monotonic() < deadline and not (server.connections >= 2 and bridge.connected):
            time.sleep(0.05)
        return fatal, bridge.connected, config
    finally:
        bridge.stop()
        service.close()


def test_a_coordinator_whose_session_is_taken_over_stops_instead_of_fighting(tmp_path):
    with FakeMqttServer(disconnect_reason=SESSION_TAKEN_OVER) as server:
        fatal, connected, config = run_bridge_until_disconnected(server, tmp_path)
        # the old behaviour: paho reconnected within seconds and kicked the other client back
        assert server.connections == 1, "the coordinator reconnected to take its session back"
    ((kind, reason),) = fatal
    assert kind is FatalReason.SESSION_TAKEN_OVER and config.client_id in reason
    assert not connected


def test_a_coordinator_disconnected_for_another_reason_reconnects(tmp_path):
    """The same server with another reason code: the bridge reconnects and nothing is fatal, so
    the takeover test above sees the reason code, not the fake server's manners."""
    with FakeMqttServer(disconnect_reason=SERVER_SHUTTING_DOWN) as server:
        fatal, connected, _ = run_bridge_until_disconnected(server, tmp_path)
        assert server.connections == 2
    assert fatal == [] and connected
