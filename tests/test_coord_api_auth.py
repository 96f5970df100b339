"""The operator API is locked: over real HTTP, no request without the token or with a simple
(CSRF-able) content type changes the fleet; promoting what a canary rolled back needs force."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from coordinator.api import ApiServer, FleetApi
from coordinator.clock import ManualClock
from coordinator.ports import LocalFleetPort
from coordinator.service import FleetService
from shared.http_auth import RequestGuard, ensure_token_file
from shared.protocol import JobKind
from tests.coord_fleet_helpers import jobs_in, make_config
from tests.test_coord_service import answer_canaries, finetune_all, join


@pytest.fixture
def served(tmp_path):
    """A fleet of two devices behind the API, its token in the state dir as the CLI makes it."""
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = join(service, clock, "pi-1", "pi-2")
    token_file = tmp_path / "api-token"
    guard = RequestGuard(ensure_token_file(token_file), f"in the file {token_file}")
    server = ApiServer(FleetApi(LocalFleetPort(service)), "127.0.0.1", 0, guard)
    server.start()
    yield f"http://127.0.0.1:{server.port}", service, devices, token_file
    server.stop()
    service.close()


def send(url: str, method: str = "GET", body: bytes | None = None, **headers: str):
    """(status, JSON body, response headers), whatever the status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response), response.headers
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), err.headers


def fleet_state(service: FleetService) -> tuple:
    return service.rounds(), service.jobs(), service.adapters(), service.runs()


def test_no_request_without_the_token_or_as_a_simple_request_changes_anything(served):
    base, service, _, token_file = served
    token = token_file.read_text().strip()
    before = fleet_state(service)
    bodies = {
        "/finetune": {"all": True},
        "/evaluate": {"all": True},
        "/adapters/fan-x/1/promote": {"force": True},
        "/adapters/fan-x/rollback": {},
    }
    attempts = [
        # what a page in the operator's browser can send cross-origin without a preflight
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {},
        # a script that knows the API but not the token
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json", "Authorization": "Bearer not-the-token-1234567"},
        {"Content-Type": "application/json", "Authorization": token},  # no scheme
        # the token, but still a simple request
        {"Content-Type": "text/plain", "Authorization": f"Bearer {token}"},
    ]
    answers = []
    for headers in attempts:
        for path, body in bodies.items():
            status, payload, _ = send(base + path, "POST", json.dumps(body).encode(), **headers)
            answers.append(status)
            assert status in (401, 415) and payload["error"], (path, headers, payload)
    assert answers.count(415) == len(bodies)  # only the last attempt had the token
    assert fleet_state(service) == before and jobs_in(service.tick()) == []

    status, started, _ = send(
        base + "/finetune",
        "POST",
        b'{"all": true}',
        **{"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    assert status == 200 and started["rounds"][0]["devices"] == ["pi-1", "pi-2"]
    assert len(jobs_in(service.tick(), JobKind.FINETUNE)) == 2


def test_a_401_says_how_to_get_the_token(served):
    base, _, _, token_file = served
    status, payload, headers = send(
        base + "/finetune", "POST", b"{}", **{"Content-Type": "application/json"}
    )
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in payload["error"] and str(token_file) in payload["error"]
    status, payload, _ = send(base + "/finetune", "POST", b"{}", **{"Content-Type": "text/xml"})
    assert status == 401  # the token first: a stranger learns nothing about the request


def test_reads_from_loopback_need_no_token(served):
    base, *_ = served
    status, devices, _ = send(base + "/devices")
    assert status == 200 and len(devices) == 2
    assert send(base + "/health")[0] == 200


def rolled_back_v1(service: FleetService, devices) -> str:
    """A round whose candidate (v1) measured worse on its canaries: ROLLED_BACK."""
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    answer_canaries(service, devices, service.tick(), candidate=0.2, current=0.9)
    service.tick()
    (cohort,) = service.adapters()
    assert cohort["rollouts"][0]["state"] == "ROLLED_BACK" and cohort["current_version"] is None
    return cohort["cohort"]


def test_promoting_a_version_its_canary_rolled_back_needs_force(tmp_path):
    clock = ManualClock()
    service = FleetService(make_config(tmp_path), clock=clock)
    try:
        api = FleetApi(LocalFleetPort(service))
        cohort = rolled_back_v1(service, join(service, clock, "pi-1", "pi-2"))
        path = f"/adapters/{cohort}/1/promote"
        status, payload = api.handle("POST", path, b"{}")
        assert status == 409 and "rolled it back" in payload["error"]
        assert '"force": true' in payload["error"]
        assert api.handle("POST", path, b'{"force": "yes"}')[0] == 400
        assert api.handle("POST", path, b'{"forse": true}')[0] == 400
        assert service.adapters()[0]["current_version"] is None
        assert jobs_in(service.tick(), JobKind.APPLY_ADAPTER) == []

        status, promoted = api.handle("POST", path, b'{"force": true}')
        assert status == 200 and promoted["current_version"] == 1
        assert service.adapters()[0]["current_version"] == 1
    finally:
        service.close()


def test_the_dashboard_state_is_not_open_to_a_rebound_name(served):
    """A page on attacker.example whose name now resolves to 127.0.0.1 reads nothing."""
    base, _, _, token_file = served
    status, body, _ = send(base + "/dashboard/state", Host="attacker.example")
    assert status == 401 and "attacker.example" in body["error"]
    token = token_file.read_text().strip()
    auth = {"Host": "attacker.example", "Authorization": f"Bearer {token}"}
    assert send(base + "/dashboard/state", **auth)[0] == 200
    assert send(base + "/dashboard/state", Host=base.removeprefix("http://"))[0] == 200
