"""The control endpoint of a process fleet, and `skipfleet fleet` driving it (real agents)."""

# Fixtures imported from tests/fleet_fixtures.py are parameters here, by design:
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.protocol import PresenceState
from skipfleet.cli import main as skipfleet
from skipfleet.fleet.base import CutMode, DeviceState, FleetUnavailable, InvalidRequest
from skipfleet.fleet.control import ControlServer
from skipfleet.fleet.remote import RemoteFleet
from skipfleet.processes import REPO, child_env
from tests.fleet_fixtures import fan_scenario, fleet, watch  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture
def control(fleet, monkeypatch):
    with ControlServer(fleet) as server:
        # `skipfleet fleet --control URL` finds the token through the environment
        monkeypatch.setenv("SKIPFLEET_FLEET_TOKEN_FILE", str(server.token_file))
        yield server


def request(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    """As an operator's client sends it: JSON with the fleet's token (unless headers say else),
    the token file the `control` fixture names in the environment."""
    if headers is None:
        token = Path(os.environ["SKIPFLEET_FLEET_TOKEN_FILE"]).read_text().strip()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = skipfleet(["fleet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_http_verbs_and_errors(control, fleet):
    status, body = request(control.url + "/devices")
    assert status == 200 and [d["device_id"] for d in body["devices"]] == fleet_ids(fleet)
    dev = fleet_ids(fleet)[0]
    status, body = request(f"{control.url}/devices/{dev}/pause", "POST")
    assert status == 200 and body["device"]["state"] == "paused"
    status, body = request(f"{control.url}/devices/{dev}/cut", "POST", b'{"mode": "refuse"}')
    assert status == 200 and "cut: refuse" in body["device"]["detail"]
    cases = [
        ("POST", "/devices/nope/kill", None, 404, "unknown_device"),
        ("POST", f"/devices/{dev}/explode", None, 400, "invalid_request"),
        ("POST", f"/devices/{dev}/cut", b'{"mode": "sever"}', 400, "invalid_request"),
        ("POST", "/scale", b'{"devices": -1}', 400, "invalid_request"),
        ("POST", "/scale", b'{"devices": "3"}', 400, "invalid_request"),
        ("POST", "/scale", b"{not json", 400, "invalid_request"),
        ("POST", "/broker/melt", None, 400, "invalid_request"),
        ("GET", "/nowhere", None, 404, "not_found"),
        ("GET", "/scale", None, 405, "method_not_allowed"),
        ("POST", "/devices", None, 405, "method_not_allowed"),
        ("DELETE", f"/devices/{dev}", None, 405, "method_not_allowed"),
    ]
    for method, path, payload, want_status, want_code in cases:
        status, body = request(control.url + path, method, payload)
        assert (status, body["code"]) == (want_status, want_code), (path, body)
        assert body["error"]
    assert request(f"{control.url}/devices/{dev}/kill", "POST")[0] == 200
    status, body = request(f"{control.url}/devices/{dev}/resume", "POST")
    assert status == 409 and body["code"] == "state_conflict" and "dead" in body["error"]
    fleet.stop()
    status, body = request(f"{control.url}/devices/{dev}/restart", "POST")
    assert status == 503 and body["error"] == "the fleet is stopped"


def test_remote_fleet_maps_errors_back(control, fleet):
    remote = RemoteFleet(control.url, token_file=control.token_file)
    with pytest.raises(InvalidRequest, match="device count"):
        remote.scale(-2)
    rows = remote.cut_broker(CutMode.REFUSE)
    assert {r.state for r in rows} == {DeviceState.CUT}
    assert {r.state for r in remote.restore_broker()} == {DeviceState.RUNNING}
    control.stop()
    assert fleet.control_url is None
    with pytest.raises(FleetUnavailable, match="no fleet control endpoint"):
        remote.devices()


def test_cli_drives_the_fleet(control, fleet, watch, capsys):
    dev, other, _ = fleet_ids(fleet)
    code, out, _ = cli(capsys, "--control", control.url, "ls")
    assert code == 0 and out.splitlines()[0].split() == ["DEVICE", "STATE", "PID", "UPTIME",
                                                         "RSS", "DETAIL"]  # fmt: skip
    assert all(d in out for d in fleet_ids(fleet))
    since = watch.mark()
    code, out, _ = cli(capsys, "--control", control.url, "kill", dev)
    assert code == 0 and f"{dev}  dead" in out
    watch.presence(dev, PresenceState.OFFLINE, since)
    code, out, _ = cli(capsys, "--control", control.url, "restart", dev)
    assert code == 0 and "running" in out
    watch.presence(dev, PresenceState.ONLINE, since)
    for verb, state in [("pause", "paused"), ("resume", "running"), ("cut", "cut"),
                        ("restore", "running")]:  # fmt: skip
        code, out, _ = cli(capsys, "--control", control.url, verb, other)
        assert code == 0 and fleet.device(other).state.value == state, (verb, out)
    code, out, _ = cli(capsys, "--control", control.url, "--json", "cut-broker", "--mode",
                       "refuse")  # fmt: skip
    assert code == 0 and {row["state"] for row in json.loads(out)} == {"cut"}
    code, out, _ = cli(capsys, "--control", control.url, "restore-broker")
    assert code == 0 and "cut" not in out
    code, out, _ = cli(capsys, "--run-dir", str(fleet.run_dir), "scale", "4")
    assert code == 0 and "fan-extra-3" in out and len(fleet.devices()) == 4
    code, out, _ = cli(capsys, "--run-dir", str(fleet.run_dir), "scale", "1")
    assert code == 0 and fleet_ids(fleet) == [dev]


def test_cli_errors_have_messages_and_exit_codes(control, fleet, tmp_path, capsys):
    dev = fleet_ids(fleet)[0]
    assert cli(capsys, "--control", control.url, "kill", dev)[0] == 0
    cases = [
        (["--control", control.url, "kill", "nope"], 4, "unknown device 'nope'"),
        (["--control", control.url, "pause", dev], 5, "dead"),
        (["--control", "http://127.0.0.1:9", "ls"], 3, "no fleet control endpoint"),
        (["--run-dir", str(tmp_path / "nothing"), "ls"], 3, "fleet.json: no such file"),
        (["ls"], 2, "--control URL, --run-dir DIR or --docker"),
        (["--control", control.url, "--project", "x", "ls"], 2, "--project goes with --docker"),
    ]
    for argv, want_code, message in cases:
        code, _, err = cli(capsys, *argv)
        assert code == want_code and message in err, (argv, err)
    with pytest.raises(SystemExit) as usage:  # argparse's own usage errors exit 2
        cli(capsys, "--control", control.url, "scale", "-1")
    assert usage.value.code == 2


def test_the_console_command_reads_the_run_dir(control, fleet):
    result = subprocess.run(
        [sys.executable, "-m", "skipfleet.cli", "fleet", "--run-dir", str(fleet.run_dir), "ls"],
        capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert all(dev in result.stdout for dev in fleet_ids(fleet))


def test_nothing_changes_without_the_token_or_with_a_simple_request(
    control, fleet, capsys, monkeypatch
):
    """A page in the operator's browser can send a cross-origin text/plain or form POST, but not
    a JSON one and not an Authorization header: none of them kills, pauses or scales anything."""
    dev = fleet_ids(fleet)[0]
    token = control.token_file.read_text().strip()
    assert control.token_file.stat().st_mode & 0o777 == 0o600
    attempts = [
        ({}, 401),
        ({"Content-Type": "application/json"}, 401),
        ({"Content-Type": "application/json", "Authorization": "Bearer wrong-token-0123456789"},
         401),
        ({"Content-Type": "text/plain", "Authorization": f"Bearer {token}"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded",
          "Authorization": f"Bearer {token}"}, 415),
    ]  # fmt: skip
    paths = [f"/devices/{dev}/kill", f"/devices/{dev}/pause", "/scale", "/broker/cut"]
    for headers, want in attempts:
        for path in paths:
            status, body = request(control.url + path, "POST", b'{"devices": 0}', headers)
            assert status == want and body["error"], (path, headers, body)
            if want == 401:
                assert str(control.token_file) in body["error"]
    rows = fleet.devices()
    assert len(rows) == 3 and {r.state for r in rows} == {DeviceState.RUNNING}
    assert request(control.url + "/devices", headers={})[0] == 200  # reads: open on loopback
    monkeypatch.delenv("SKIPFLEET_FLEET_TOKEN_FILE")
    code, _, err = cli(capsys, "--control", control.url, "kill", dev)
    assert code == 1 and "Authorization: Bearer" in err
    assert fleet.device(dev).state is DeviceState.RUNNING


def fleet_ids(fleet) -> list[str]:
    return [d.device_id for d in fleet.devices()]
