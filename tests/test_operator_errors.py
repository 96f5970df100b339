"""Errors that say what to do, each from the real failure: a dead port, a TLS certificate the
client cannot verify, refused credentials and the ACL's refusals from a real mosquitto running
the deploy/ config, the coordinator without its extra, `--version`, `status --json`, `simulate
--broker` to a dead port, and `fleet --run-dir` given the run dir simulate prints.

Before: the agent logged only paho's "Client is not connected", never the reason; an account
whose user name is not the device id connected and then nothing happened; `simulate --broker`
to a dead port waited 300 s; the coordinator without Ray exited 70 with a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version

import pytest

from agent.errors import BrokerRefused
from agent.outbox import Outbox
from agent.spool import Spool
from agent.transport import Transport
from coordinator.bridge import MqttBridge
from coordinator.clock import ManualClock
from coordinator.metrics import FleetMetrics
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.mqtt import MqttSettings, Will
from skipfleet.brokers import free_port
from skipfleet.cli import main
from skipfleet.fleet.runstate import control_url_of, fleet_dir_of, write_run_state
from tests.coord_fleet_helpers import make_config
from tests.topology import DeployBroker, make_accounts

WAIT_S = 10.0


def wait_for_record(caplog, text: str) -> logging.LogRecord:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for record in caplog.records:
            if text in record.getMessage():
                return record
        time.sleep(0.02)
    raise AssertionError(f"no log record with {text!r}: {caplog.text}")


@pytest.fixture
def transport(tmp_path):
    """An agent Transport for `device_id` to `settings`; stopped at the end."""
    made: list[tuple[Transport, Spool]] = []
    fatal: list[BrokerRefused] = []

    def make(settings: MqttSettings, device_id: str = "device-0") -> Transport:
        spool = Spool(tmp_path / f"spool-{len(made)}.sqlite", max_messages=10)
        status, commands = f"fleet/{device_id}/status", f"fleet/{device_id}/cmd/#"
        wired = Transport(settings, client_id=device_id, subscriptions=[(commands, 1)],
                          status_topic=status, will=Will(status, b"offline"),
                          online_payload=lambda: b"online",
                          outbox=Outbox(spool, lambda item: None),
                          on_message=lambda topic, payload: None,
                          on_fatal=fatal.append)  # fmt: skip
        made.append((wired, spool))
        wired.start()
        return wired

    yield make, fatal
    for wired, spool in made:
        wired.stop(b"offline", timeout=1.0)
        spool.close()


def test_the_agent_says_which_broker_refused_the_connection_and_what_to_check(transport, caplog):
    make, _ = transport
    port = free_port()  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="agent.transport"):
        make(MqttSettings("127.0.0.1", port))
        record = wait_for_record(caplog, "connection refused")
    said = record.getMessage()
    assert record.levelno == logging.ERROR
    assert f"127.0.0.1:{port}" in said and "the broker runs" in said and "--broker" in said


def test_the_coordinator_says_which_broker_refused_the_connection(tmp_path, caplog):
    port = free_port()
    config = dataclasses.replace(make_config(tmp_path), mqtt=MqttSettings("127.0.0.1", port))
    service = FleetService(config, clock=ManualClock())
    bridge = MqttBridge(config, LocalFleetPort(service), FleetMetrics())  # a real paho client
    try:
        with caplog.at_level(logging.WARNING, logger="coordinator.bridge"):
            bridge.start()
            said = wait_for_record(caplog, "connection refused").getMessage()
        assert f"127.0.0.1:{port}" in said and "--broker" in said
    finally:
        bridge.stop()
        service.close()


@pytest.fixture
def self_signed_tls_port(tmp_path):
    """A TLS listener with a self-signed certificate (no CA the client knows signed it)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(2.0)
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused our certificate: as expected

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_a_tls_verification_failure_is_logged_with_its_reason(transport, caplog,
                                                              self_signed_tls_port):  # fmt: skip
    make, _ = transport
    with caplog.at_level(logging.WARNING, logger="agent.transport"):
        make(MqttSettings("127.0.0.1", self_signed_tls_port, tls=True))
        said = wait_for_record(caplog, "certificate verify failed").getMessage()
    assert "certificate verify failed: self-signed certificate" in said
    assert "--tls-ca" in said


@pytest.fixture(scope="module")
def deploy_broker(tmp_path_factory):
    """mosquitto with deploy/'s config: per-device accounts, the ACL, use_username_as_clientid."""
    root = tmp_path_factory.mktemp("errors-broker")
    passwords = make_accounts(2, root / "secrets")
    broker = DeployBroker(root, root / "secrets" / "mosquitto_passwd")
    yield broker, passwords
    broker.stop()


@pytest.mark.slow
def test_refused_credentials_end_the_agent_with_the_mqtt5_reason_code(transport, deploy_broker):
    make, fatal = transport
    broker, _ = deploy_broker
    make(MqttSettings("127.0.0.1", broker.port, username="device-0", password="wrong"))
    deadline = time.monotonic() + WAIT_S
    while not fatal and time.monotonic() < deadline:
        time.sleep(0.02)
    (refused,) = fatal  # mosquitto 2 answers a wrong password with 0x87 (0x86 elsewhere)
    assert "MQTT 5 reason code 0x87 Not authorized" in str(refused)
    assert "--password-file" in str(refused) and "'device-0'" in str(refused)


@pytest.mark.slow
def test_publishes_the_acl_refuses_are_explained_the_user_name_must_be_the_device_id(
    transport, deploy_broker, caplog
):
    make, fatal = transport
    broker, passwords = deploy_broker
    # device-1's account, running as device-0: it connects, then every publish is refused
    settings = MqttSettings("127.0.0.1", broker.port, username="device-1",
                            password=passwords["device-1"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="agent.transport"):
        make(settings, device_id="device-0")
        said = wait_for_record(caplog, "PUBACK reason code 0x87").getMessage()
    assert "must equal the device id" in said and "'device-1'" in said and "'device-0'" in said
    assert fatal == []  # connected: the refusal is of the publishes, not of the account


def test_the_coordinator_without_its_extra_says_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as on an agent install
    state_dir = tmp_path / "state"
    code = main(["coordinator", "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(state_dir)])
    err = capsys.readouterr().err
    assert code == 69 and not state_dir.exists()
    assert "pip install 'skipfleet[coordinator]'" in err and "ray" in err
    assert "Traceback" not in err


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"skipfleet {version('skipfleet')}"


def test_status_json_prints_the_devices_the_api_gives(capsys):
    devices = [{"device_id": "pi-1", "online": True, "running": {"version": 3}}]

    class Api(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(devices if self.path == "/devices" else {}).encode()
            self.send_response(200 if self.path == "/devices" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["status", "--api", url, "--json"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert json.loads(capsys.readouterr().out) == devices


def test_simulate_with_a_dead_broker_fails_in_seconds_and_says_why(tmp_path, capsys):
    port = free_port()
    run_dir = tmp_path / "run"
    started = time.monotonic()
    code = main(["simulate", "--broker", f"mqtt://127.0.0.1:{port}", "--run-dir", str(run_dir)])
    took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 1 and took < WAIT_S, took  # before: --timeout (300 s), then a Ray warning
    assert f"127.0.0.1:{port}: connection refused" in err
    assert not run_dir.exists()  # nothing pre-trained, nothing started


def test_fleet_run_dir_takes_the_run_dir_simulate_prints(tmp_path):
    run_dir = tmp_path / "simulate-run"  # simulate keeps its fleet.json in RUN/fleet/
    write_run_state(run_dir / "fleet", {"running": True, "control_url": "http://127.0.0.1:9"})
    assert fleet_dir_of(run_dir) == run_dir / "fleet"
    assert control_url_of(fleet_dir_of(run_dir)) == "http://127.0.0.1:9"
    assert fleet_dir_of(run_dir / "fleet") == run_dir / "fleet"  # the old path still works
