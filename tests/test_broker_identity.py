"""Client-id takeover on the compose broker (deploy/mosquitto/mosquitto.conf, its ACL and accounts
made by make-accounts.sh, run by a real mosquitto): a device account that connects under the
coordinator's client id or another device's kicks nobody and destroys no queued command, because
the broker derives the client id from the account (use_username_as_clientid)."""

from __future__ import annotations

import pytest

from tests.topology import DeployBroker, Mqtt, make_accounts

pytestmark = pytest.mark.slow

SESSION_S = 600
COORDINATOR_CLIENT_ID = "skipfleet-coordinator-0123456789"  # what a coordinator would ask for


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity-broker")
    passwords = make_accounts(3, root / "secrets")
    broker = DeployBroker(root, root / "secrets" / "mosquitto_passwd")
    yield broker, passwords
    broker.stop()


@pytest.fixture
def connect(broker):
    deploy, passwords = broker
    opened: list[Mqtt] = []

    def client(user: str, client_id: str, session_expiry_s: int = 0) -> Mqtt:
        mqtt = Mqtt(deploy.port, client_id, user, passwords[user])
        opened.append(mqtt)
        assert not mqtt.connect(session_expiry_s).is_failure, (user, client_id)
        return mqtt

    yield client
    for mqtt in opened:
        mqtt.close()


def test_a_device_account_cannot_kick_the_coordinator_or_another_device(connect):
    coordinator = connect("coordinator", COORDINATOR_CLIENT_ID)
    victim = connect("device-0", "device-0")
    assert not coordinator.subscribe("fleet/+/status").is_failure
    # device-2's own credentials, asking for the others' client ids
    for stolen in (COORDINATOR_CLIENT_ID, "device-0", "coordinator"):
        connect("device-2", stolen)
    assert coordinator.disconnects == [] and victim.disconnects == []  # 0 takeovers
    # and both still work: the victim's status reaches the coordinator
    assert not victim.publish("fleet/device-0/status", b"still here").is_failure
    assert [m.payload for m in coordinator.received(5.0, 1)] == [b"still here"]
    assert victim.disconnects == [] and coordinator.disconnects == []


def test_commands_queued_for_an_offline_device_survive_a_clean_start_under_its_id(connect):
    device = connect("device-1", "device-1", SESSION_S)
    assert not device.subscribe("fleet/device-1/cmd/#").is_failure
    device.close()  # offline; its session (and subscription) stay on the broker
    coordinator = connect("coordinator", COORDINATOR_CLIENT_ID)
    for k in range(10):
        assert not coordinator.publish("fleet/device-1/cmd/job", f"job {k}".encode()).is_failure
    # another account connects with the device's client id and a clean start: before
    # use_username_as_clientid this threw the device's session and its 10 commands away
    connect("device-2", "device-1").close()

    back = connect("device-1", "device-1", SESSION_S)
    assert back.session_present  # the persistent session is keyed by the account
    got = [m.payload for m in back.received(5.0, 10)]
    assert got == [f"job {k}".encode() for k in range(10)]


def test_the_coordinator_account_keeps_a_persistent_session(connect):
    first = connect("coordinator", "skipfleet-coordinator-a", SESSION_S)
    assert not first.subscribe("fleet/+/report").is_failure
    first.close()
    connect("device-0", "device-0").publish("fleet/device-0/report", b"while away")
    # the client id it asks for does not matter: the session is the account's
    again = connect("coordinator", "skipfleet-coordinator-b", SESSION_S)
    assert again.session_present
    assert [m.payload for m in again.received(5.0, 1)] == [b"while away"]
