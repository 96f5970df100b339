"""The HTTP API's routing, validation and errors, over an in-process fleet state (no Ray)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from coordinator.api import ApiServer, FleetApi, to_json
from coordinator.clock import ManualClock
from coordinator.ports import LocalFleetPort, Unavailable
from coordinator.service import FleetService
from shared.http_auth import RequestGuard
from shared.protocol import JobKind, JobState
from tests.coord_fleet_helpers import SimDevice, jobs_in, make_config


@pytest.fixture
def fleet(tmp_path):
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in ("pi-1", "pi-2")]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    yield FleetApi(LocalFleetPort(service)), service, devices
    service.close()


def post(api: FleetApi, path: str, body: object) -> tuple[int, object]:
    return api.handle("POST", path, json.dumps(body).encode())


def test_reads(fleet):
    api, _service, _ = fleet
    status, devices = api.handle("GET", "/devices")
    assert status == 200 and [d["device_id"] for d in devices] == ["pi-1", "pi-2"]
    assert devices[0]["online"] and devices[0]["cohort"].startswith("fan-")
    status, device = api.handle("GET", "/devices/pi-1/")
    assert status == 200 and device["jobs"] == []
    assert api.handle("GET", "/devices/pi-9")[0] == 404
    assert api.handle("GET", "/devices/pi-1/adapters") == (200, [])  # none fine-tuned yet
    assert api.handle("GET", "/devices/pi-9/adapters")[0] == 404
    assert api.handle("GET", "/jobs?limit=5&device=pi-1") == (200, [])
    assert api.handle("GET", "/rounds") == (200, [])
    assert api.handle("GET", "/adapters") == (200, [])
    status, health = api.handle("GET", "/health")
    assert status == 200 and health["devices"] == 2 and health["mqtt_connected"]


def test_finetune_starts_a_round_and_the_views_follow_it(fleet):
    api, service, _ = fleet
    status, started = post(api, "/finetune", {"devices": ["pi-1", "ghost"]})
    assert status == 200
    assert started["rounds"][0]["devices"] == ["pi-1"]
    assert started["skipped"] == {"ghost": "unknown device"}
    (job,) = jobs_in(service.tick())
    (round_view,) = api.handle("GET", "/rounds")[1]
    assert round_view["stage"] == "RUNNING" and round_view["pending"] == ["pi-1"]
    assert api.handle("GET", "/jobs?device=pi-1")[1][0]["job_id"] == job[1].job_id
    status, again = post(api, "/finetune", {"cohort": round_view["cohort"]})
    assert status == 200 and "under way" in again["skipped"]["pi-1"]


def test_evaluate_asks_devices_to_measure_what_they_run(fleet):
    api, service, devices = fleet
    status, answer = post(api, "/evaluate", {"all": True})
    assert status == 200 and answer["skipped"] == {}
    sent = jobs_in(service.tick(), JobKind.EVALUATE)
    assert sorted(device for device, _ in sent) == ["pi-1", "pi-2"]
    by_name = {d.device_id: d for d in devices}
    for device, job in sent:
        service.ingest([by_name[device].status(job.job_id, JobState.SUCCEEDED, {"accuracy": 0.8})])
    views = {d["device_id"]: d for d in api.handle("GET", "/devices")[1]}
    assert views["pi-1"]["accuracy"] == 0.8 and views["pi-2"]["accuracy"] == 0.8
    assert post(api, "/evaluate", {"devices": ["ghost"]})[1]["skipped"] == {
        "ghost": "unknown device"
    }
    assert post(api, "/evaluate", {"devices": "pi-1"})[0] == 400
    status, answer = post(api, "/evaluate", {"all": True, "adapter_version": 0})
    versions = {j.params.adapter_version for _, j in jobs_in(service.tick(), JobKind.EVALUATE)}
    assert status == 200 and versions == {0}  # the base model alone, the device does not switch
    assert post(api, "/evaluate", {"all": True, "adapter_version": -1})[0] == 400


def test_a_request_that_changed_the_fleet_wakes_the_ticks_and_a_read_or_refusal_does_not(fleet):
    _api, service, _ = fleet
    woken: list[str] = []
    api = FleetApi(LocalFleetPort(service), on_change=lambda: woken.append("tick"))
    api.handle("GET", "/devices")
    assert post(api, "/adapters/fan-x/rollback", {})[0] == 409
    assert woken == []
    assert post(api, "/finetune", {"devices": ["pi-1"]})[0] == 200
    assert woken == ["tick"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/finetune", b"{not json", 400),
        ("POST", "/finetune", b"[1, 2]", 400),
        ("POST", "/finetune", b'{"devices": "pi-1"}', 400),
        ("POST", "/finetune", b'{"devices": ["pi-1"], "all": true}', 400),
        ("POST", "/finetune", b'{"all": "yes"}', 400),
        ("POST", "/finetune", b'{"everything": true}', 400),
        ("POST", "/finetune", b"{}", 400),
        ("POST", "/finetune", b'{"cohort": "nobody"}', 400),
        ("POST", "/finetune", b"x" * 70_000, 413),
        ("GET", "/finetune", b"", 405),
        ("POST", "/devices", b"", 405),
        ("GET", "/nothing", b"", 404),
        ("GET", "/devices/UPPER", b"", 404),
        ("GET", "/jobs?limit=0", b"", 400),
        ("GET", "/jobs?limit=many", b"", 400),
        ("GET", "/jobs?device=Not_An_Id", b"", 400),
        ("POST", "/adapters/fan-x/1/promote", b"", 404),
        ("POST", "/adapters/fan-x/rollback", b"", 409),
    ],
)
def test_bad_requests_get_clear_json_errors(fleet, method, path, body, status):
    api, *_ = fleet
    got, payload = api.handle(method, path, body)
    assert got == status and isinstance(payload["error"], str) and payload["error"]


def test_an_unavailable_fleet_state_is_a_503(fleet):
    class Down(LocalFleetPort):
        def read(self, view, *args):
            raise Unavailable("restarting")

    _, service, _ = fleet
    status, payload = FleetApi(Down(service)).handle("GET", "/devices")
    assert status == 503 and "restarting" in payload["error"]


def test_health_is_503_without_the_broker(fleet):
    _, service, _ = fleet
    status, payload = FleetApi(LocalFleetPort(service), bridge_connected=lambda: False).handle(
        "GET", "/health"
    )
    assert status == 503 and "MQTT" in payload["error"]


def test_the_server_speaks_json_over_http(fleet):
    api, *_ = fleet
    server = ApiServer(api, "127.0.0.1", 0, RequestGuard("t" * 32, "in a test"))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"{base}/devices", timeout=10) as response:
            assert response.headers["Content-Type"] == "application/json"
            assert len(json.load(response)) == 2
        headers = {"Content-Type": "application/json", "Authorization": "Bearer " + "t" * 32}
        request = urllib.request.Request(
            f"{base}/finetune", data=b"{oops", method="POST", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=10)
        assert error.value.code == 400 and "JSON" in json.load(error.value)["error"]
    finally:
        server.stop()


def test_json_output_is_strict():
    assert json.loads(to_json({"gap": [float("inf"), 1.0], "x": float("nan")})) == {
        "gap": [None, 1.0],
        "x": None,
    }


def test_a_taken_api_port_is_port_unavailable_naming_it_and_metrics_stop_serving(fleet, tmp_path):
    import dataclasses
    import socket

    from coordinator.app import PortUnavailable, serve_api, serve_metrics

    api, *_ = fleet
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = dataclasses.replace(
            make_config(tmp_path / "other"), metrics_addr="127.0.0.1", metrics_port=0,
            api_addr="127.0.0.1", api_port=port,
        )  # fmt: skip
        metrics, metrics_port = serve_metrics(config)
        with pytest.raises(PortUnavailable, match=f"the API on 127.0.0.1:{port}"):
            serve_api(config, api, RequestGuard("t" * 32, "in a test"), metrics)
        with socket.create_server(("127.0.0.1", metrics_port)):  # free again: it stopped
            pass
        metrics_taken = dataclasses.replace(config, metrics_port=port)
        with pytest.raises(PortUnavailable, match=f"/metrics on 127.0.0.1:{port}"):
            serve_metrics(metrics_taken)
