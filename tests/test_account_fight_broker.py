"""Coordinators on the compose broker (deploy/mosquitto config, ACL and accounts made by
make-accounts.sh, run by a real mosquitto 2.0.11): with an account each, two coordinators run side
by side and never kick each other; on one account, the one kicked first stops (exit 75 in the CLI)
instead of fighting forever; a restarting broker or a link cut again and again is ridden out.

The bridges run in this process on their own fleet state (no Ray); the CLI test runs the real
`skipfleet coordinator`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.account_fight import FIGHT_STREAK, short_session_s
from coordinator.bridge import FatalReason, MqttBridge
from coordinator.metrics import FleetMetrics
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.mqtt import parse_broker_url
from skipfleet.fleet.base import CutMode
from skipfleet.fleet.proxy import ProxyLoop
from skipfleet.processes import REPO, child_env
from tests.coord_fleet_helpers import make_config
from tests.topology import DeployBroker, Mqtt, make_accounts

pytestmark = pytest.mark.slow

SHORT_S = short_session_s(1)  # the coordinator's default reconnect_min_delay_s
# What mosquitto logs each time a connection takes a client id over from an older one.
TAKEOVER_LINE = "already connected, closing old connection"
SIDE_BY_SIDE_S = 20.0
FIGHT_DECIDED_S = 60.0  # FIGHT_STREAK short sessions at 1-2 s each, with a wide margin


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    root = tmp_path_factory.mktemp("account-fight")
    passwords = make_accounts(1, root / "secrets", coordinators=["east"])
    broker = DeployBroker(root / "broker", root / "secrets" / "mosquitto_passwd")
    yield broker, passwords
    broker.stop()


class Running:
    """A coordinator's MQTT bridge on its own fleet state, and what it reported as fatal."""

    def __init__(self, url: str, account: str, password: str, state_dir, instance: str) -> None:
        settings = parse_broker_url(url, username=account, password=password, session_expiry_s=600)
        config = dataclasses.replace(make_config(state_dir), mqtt=settings, instance=instance)
        self.client_id = config.client_id  # what the bridge asks for (the broker overrides it)
        self.service = FleetService(config)
        self.fatal: list[tuple[FatalReason, str]] = []
        self.bridge = MqttBridge(
            config, LocalFleetPort(self.service), FleetMetrics(),
            on_fatal=lambda *reported: self.fatal.append(reported),
        )  # fmt: skip
        self.bridge.start()

    def stop(self) -> None:
        self.bridge.stop()
        self.service.close()


@pytest.fixture
def coordinators(deploy, tmp_path):
    broker, passwords = deploy
    started: list[Running] = []

    def start(account: str, url: str | None = None) -> Running:
        n = len(started)
        running = Running(url or broker.url, account, passwords[account],
                          tmp_path / f"state-{n}", f"instance-{n}")  # fmt: skip
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def takeovers(broker: DeployBroker) -> int:
    return broker.log().count(TAKEOVER_LINE)


def connected_throughout(running: list[Running], seconds: float) -> bool:
    """Every bridge connected at every 50 ms sample for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not all(r.bridge.connected for r in running):
            return False
        time.sleep(0.05)
    return True


def test_two_coordinators_with_their_own_accounts_never_kick_each_other(deploy, coordinators):
    broker, _ = deploy
    before = takeovers(broker)
    pair = [coordinators("coordinator"), coordinators("coordinator-east")]
    assert wait_until(lambda: all(r.bridge.connected for r in pair), 10)
    assert connected_throughout(pair, SIDE_BY_SIDE_S)
    assert takeovers(broker) == before  # 0 client-id takeovers
    assert [r.fatal for r in pair] == [[], []]


def test_a_second_coordinator_account_reads_the_fleet_and_sends_commands(deploy):
    """The ACL block make-accounts.sh wrote for coordinator-east grants the coordinator's role."""
    broker, passwords = deploy
    east = Mqtt(broker.port, "east", "coordinator-east", passwords["coordinator-east"])
    device = Mqtt(broker.port, "device-0", "device-0", passwords["device-0"])
    try:
        assert not east.connect().is_failure and not device.connect().is_failure
        assert not east.subscribe("fleet/+/status").is_failure
        assert not device.subscribe("fleet/device-0/cmd/#").is_failure
        assert not device.publish("fleet/device-0/status", b"up").is_failure
        assert [m.payload for m in east.received(5.0, 1)] == [b"up"]
        assert not east.publish("fleet/device-0/cmd/job", b"job").is_failure
        assert [m.payload for m in device.received(5.0, 1)] == [b"job"]
        # and nothing a device may not: the coordinator account cannot speak for a device
        assert east.publish("fleet/device-0/report", b"forged").is_failure
    finally:
        east.close()
        device.close()


def test_two_coordinators_on_one_account_the_newcomer_stops_and_the_first_keeps_it(
    deploy, coordinators
):
    broker, _ = deploy
    first = coordinators("coordinator")
    assert wait_until(lambda: first.bridge.connected, 10)
    time.sleep(SHORT_S + 1)  # the first one has been running a while
    before = takeovers(broker)
    second = coordinators("coordinator")
    began = time.monotonic()
    assert wait_until(lambda: second.fatal, FIGHT_DECIDED_S), "the two fought on"
    decided_s = time.monotonic() - began
    ((kind, message),) = second.fatal
    assert kind is FatalReason.ACCOUNT_SHARED
    assert "'coordinator'" in message and "make-accounts.sh --coordinator NAME" in message
    fought = takeovers(broker) - before
    assert fought <= 2 * FIGHT_STREAK + 1, f"{fought} takeovers in {decided_s:.1f} s"
    # The fight is over: the first one keeps the account, and nobody kicks anybody any more.
    assert wait_until(lambda: first.bridge.connected, 5)
    settled = takeovers(broker)
    assert connected_throughout([first], 2 * SHORT_S)
    assert not second.bridge.connected and first.fatal == []
    assert takeovers(broker) == settled


def test_a_broker_restarted_again_and_again_is_ridden_out(deploy, coordinators):
    """Sessions shorter than SHORT_S, FIGHT_STREAK + 2 times in a row, as in a fight; but a
    restarting broker refuses connections while it is down, and a fight never does."""
    broker, _ = deploy
    running = coordinators("coordinator")
    for _ in range(FIGHT_STREAK + 2):
        assert wait_until(lambda: running.bridge.connected, 15)
        time.sleep(1.0)
        broker.kill()  # no DISCONNECT to anyone, as a takeover on mosquitto 2.0.11
        time.sleep(3.0)
        broker.start()
    assert wait_until(lambda: running.bridge.connected, 15)
    assert connected_throughout([running], 2.0)
    assert running.fatal == []


def test_a_link_cut_again_and_again_is_ridden_out(deploy, coordinators):
    """The network between coordinator and broker drops every connection a second or two after
    it is made, FIGHT_STREAK + 2 times; attempts while it is down fail."""
    broker, _ = deploy
    proxies = ProxyLoop()
    try:
        link = proxies.open("127.0.0.1", broker.port, name="coordinator")
        running = coordinators("coordinator", url=f"mqtt://127.0.0.1:{link.port}")
        for _ in range(FIGHT_STREAK + 2):
            assert wait_until(lambda: running.bridge.connected, 15)
            time.sleep(1.0)
            link.cut(CutMode.REFUSE)  # resets the connection and every attempt meanwhile
            time.sleep(3.0)
            link.restore()
        assert wait_until(lambda: running.bridge.connected, 15)
        assert running.fatal == []
    finally:
        proxies.close()


class Fighter:
    """A plain MQTT client on the coordinator account that reconnects whenever it is kicked,
    as another coordinator would."""

    def __init__(self, port: int, password: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="fighter",
                                  protocol=paho.MQTTv5)  # fmt: skip
        self.client.username_pw_set("coordinator", password)
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_the_cli_exits_75_naming_the_account_when_another_client_fights_for_it(
    deploy, ray_session, tmp_path
):
    broker, passwords = deploy
    secret = tmp_path / "coordinator_password"
    secret.write_text(passwords["coordinator"])
    fighter = Fighter(broker.port, passwords["coordinator"])
    try:
        result = subprocess.run(
            [sys.executable, "-m", "skipfleet.cli", "coordinator", "--broker", broker.url,
             "--username", "coordinator", "--password-file", str(secret),
             "--state-dir", str(tmp_path / "state"),
             "--ray-address", ray_session.get_runtime_context().gcs_address,
             "--ray-namespace", "skipfleet-tests", "--api-port", "0", "--metrics-port", "0"],
            capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=180,
        )  # fmt: skip
    finally:
        fighter.close()
    assert result.returncode == 75, result.stderr[-3000:]
    assert "MQTT account 'coordinator'" in result.stderr
    assert "--username coordinator-NAME" in result.stderr


def test_a_device_connecting_again_and_again_with_the_coordinators_ids_stops_no_coordinator(
    deploy, coordinators
):
    """An attacker with a device account asks for the coordinator's client ids (its --instance
    id and its account name) 2 x FIGHT_STREAK times in a row: the broker makes the device's
    account its client id, so the coordinator is never kicked and the detector sees nothing."""
    broker, passwords = deploy
    running = coordinators("coordinator")
    assert wait_until(lambda: running.bridge.connected, 10)
    before = takeovers(broker)
    for attempt in range(2 * FIGHT_STREAK):
        client_id = running.client_id if attempt % 2 else "coordinator"
        device = Mqtt(broker.port, client_id, "device-0", passwords["device-0"])
        try:
            assert not device.connect().is_failure
        finally:
            device.close()
    assert connected_throughout([running], 2.0)
    assert running.fatal == []
    assert takeovers(broker) == before  # device-0 may take over only its own earlier id
