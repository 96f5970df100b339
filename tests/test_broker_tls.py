"""Client certificates: deploy/tls/make-certs.sh's CA, broker and device certificates, accepted
by a real mosquitto running the compose broker config plus deploy/mosquitto/tls.conf; the
certificate's CN is the account, so one device's certificate cannot act as another device."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from skipfleet.brokers import free_port
from skipfleet.deploy_broker import BrokerError
from tests.topology import DEPLOY, DeployBroker, Mqtt, make_accounts

pytestmark = pytest.mark.slow

MAKE_CERTS = DEPLOY / "tls" / "make-certs.sh"
TLS_CONF = DEPLOY / "mosquitto" / "tls.conf"
NAMES = ("device-0", "device-1", "coordinator")


def make_certs(directory: Path, *names: str) -> None:
    result = subprocess.run(
        ["bash", str(MAKE_CERTS), str(directory), "127.0.0.1", *names],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls-broker")
    certs = root / "certs"
    make_certs(certs, *NAMES)
    port = free_port()
    lines = []
    for line in TLS_CONF.read_text().splitlines():
        line = line.replace("/mosquitto/certs/", f"{certs}/")
        line = line.replace("/run/secrets/mosquitto_acl", str(root / "secrets" / "mosquitto_acl"))
        lines.append(f"listener {port} 127.0.0.1" if line == "listener 8883" else line)
    assert f"listener {port} 127.0.0.1" in lines, "tls.conf: expected one `listener 8883`"
    make_accounts(1, root / "secrets")
    broker = DeployBroker(root, root / "secrets" / "mosquitto_passwd", lines, [port])
    yield port, certs
    broker.stop()


@pytest.fixture
def connect(tls_broker):
    port, certs = tls_broker
    opened: list[Mqtt] = []

    def client(name: str | None, client_id: str, ca_dir: Path | None = None) -> Mqtt:
        """A client presenting `name`'s certificate (from ca_dir's CA), or none."""
        mqtt = Mqtt(port, client_id, None, None)
        keys = (ca_dir or certs) / "clients"
        mqtt.client.tls_set(
            ca_certs=str(certs / "ca.crt"),
            certfile=None if name is None else str(keys / f"{name}.crt"),
            keyfile=None if name is None else str(keys / f"{name}.key"),
        )
        opened.append(mqtt)
        return mqtt

    yield client
    for mqtt in opened:
        mqtt.close()


def test_each_certificate_acts_only_as_its_own_device(connect):
    coordinator, device0 = connect("coordinator", "anything-1"), connect("device-0", "anything-2")
    assert not coordinator.connect().is_failure and not device0.connect().is_failure
    assert not coordinator.subscribe("fleet/+/status").is_failure
    assert not device0.publish("fleet/device-0/status", b"mine").is_failure
    forged = device0.publish("fleet/device-1/status", b"forged")
    assert forged.is_failure and str(forged) == "Not authorized"
    assert [m.payload for m in coordinator.received(2.0, 2)] == [b"mine"]


def test_a_certificate_cannot_take_over_another_devices_session(connect):
    device1 = connect("device-1", "device-1")
    assert not device1.connect().is_failure
    assert not connect("device-0", "device-1").connect().is_failure  # asks for device-1's id
    assert not connect("device-0", "coordinator").connect().is_failure
    assert not device1.publish("fleet/device-1/status", b"still here").is_failure
    assert device1.disconnects == []  # 0 takeovers


def refused(mqtt: Mqtt) -> bool:
    """The broker would not have it: the handshake failed, or no session came of it."""
    try:
        return mqtt.connect().is_failure
    except (OSError, ssl.SSLError):
        return True
    except BrokerError:  # no CONNACK: the broker dropped the connection after the handshake
        return True


def test_no_certificate_or_one_from_another_ca_is_refused(connect, tmp_path):
    make_certs(tmp_path / "rogue", "device-0")  # a CA of its own, the same device name
    assert refused(connect("device-0", "rogue", ca_dir=tmp_path / "rogue"))
    assert refused(connect(None, "no-certificate"))
