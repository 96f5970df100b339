"""The coordinator's HTTP JSON API, on the standard library's ThreadingHTTPServer.

    GET  /health                              200 when the fleet state answers (503 otherwise)
    GET  /devices, /devices/{id}              the registry (and a device's recent jobs)
    GET  /jobs?limit=N&device=ID              jobs, newest first
    GET  /rounds?limit=N                      rounds with their failures, aggregation, rollout
    GET  /adapters                            versions, lineage and rollouts per cohort
    GET  /adapters/{cohort}/{version}         one version: lineage, arrays (base64, dtype, shape)
    GET  /runs?limit=N                        federated runs: clusters, rounds, measured gains
    GET  /clusters                            per cohort: its clusters, members, current versions
    GET  /dashboard, /dashboard/state         the live dashboard page and the JSON it polls
                                              (coordinator.dashboard), /dashboard/static/FILE
    POST /finetune                            {"devices": [...]} | {"cohort": "..."} | {"all": true}
    POST /evaluate                            the same selectors (+ "adapter_version"): devices
                                              evaluate what they run, or that version
    POST /adapters/{cohort}/{version}/promote make a stored version current, and distribute it
                                              ({"force": true} for one its canary rolled back)
    POST /adapters/{cohort}/rollback          back to the current version's parent
                                              ({"cluster": ...} when the cohort has several)

Routing and validation live in FleetApi.handle() (plain: unit-tested without sockets); every
error is a JSON body {"error": "..."} with a 4xx/5xx status. Before routing, the server asks its
RequestGuard (shared.http_auth): a POST needs the bearer token (401) and a JSON content type
(415); a GET needs the token unless it comes from loopback.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from coordinator.dashboard import (
    STATIC_DIR,
    Dashboard,
    FleetHistory,
    HistorySampler,
    static_file,
)
from coordinator.fleet import FleetRequestError
from coordinator.ports import OperatorPort, Unavailable
from shared.http_auth import RequestGuard, check_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_LIMIT = 1000
_DEVICE = r"[a-z0-9-]{1,64}"
_COHORT = r"[a-z0-9][a-z0-9._-]{0,127}"

Response = tuple[int, Any]
Query = dict[str, list[str]]  # a request's query string, as parse_qs returns it
Body = dict[str, Any]  # a POST request's JSON object
Json = Any  # a JSON-ready view (dicts, lists, numbers, strings) as the fleet actor returns it
_STATIC_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"


@dataclass(frozen=True)
class Raw:
    """A response body that is not JSON: the dashboard's page and scripts."""

    content_type: str
    data: bytes


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class FleetApi:
    def __init__(
        self,
        port: OperatorPort,
        *,
        bridge_connected: Callable[[], bool] = lambda: True,
        dashboard: Dashboard | None = None,
        on_change: Callable[[], None] = lambda: None,
    ):
        self._port = port
        self._bridge_connected = bridge_connected
        # After a request that changed the fleet state: what it put in the outbox (a round's
        # jobs, a canary, a rollout) goes out at the next tick, which this asks for now.
        self._on_change = on_change
        self.dashboard = dashboard or Dashboard(port.read, FleetHistory())
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = [
            ("GET", re.compile(r"/health"), self._health),
            ("GET", re.compile(r"/devices"), self._devices),
            ("GET", re.compile(rf"/devices/({_DEVICE})"), self._device),
            ("GET", re.compile(rf"/devices/({_DEVICE})/adapters"), self._device_adapters),
            ("GET", re.compile(r"/jobs"), self._jobs),
            ("GET", re.compile(r"/rounds"), self._rounds),
            ("GET", re.compile(r"/adapters"), self._adapters),
            ("GET", re.compile(rf"/adapters/({_COHORT})/(\d{{1,9}})"), self._adapter),
            ("GET", re.compile(r"/runs"), self._runs),
            ("GET", re.compile(r"/clusters"), self._clusters),
            ("GET", re.compile(r"/dashboard"), self._dashboard_page),
            ("GET", re.compile(r"/dashboard/state"), self._dashboard_state),
            ("GET", re.compile(rf"/dashboard/static/({_STATIC_NAME})"), self._dashboard_static),
            ("POST", re.compile(r"/finetune"), self._finetune),
            ("POST", re.compile(r"/evaluate"), self._evaluate),
            ("POST", re.compile(rf"/adapters/({_COHORT})/(\d{{1,9}})/promote"), self._promote),
            ("POST", re.compile(rf"/adapters/({_COHORT})/rollback"), self._rollback),
        ]

    def handle(self, method: str, target: str, body: bytes = b"") -> Response:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        try:
            handler, args = self._route(method, path)
            if method == "POST":
                answer = handler(_json_body(body), *args)
                self._on_change()
                return HTTPStatus.OK, answer
            return HTTPStatus.OK, handler(query, *args)
        except ApiError as err:
            return err.status, {"error": str(err)}
        except FleetRequestError as err:
            return HTTPStatus(err.status), {"error": str(err)}
        except Unavailable as err:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(err)}
        except Exception:
            log.exception("%s %s failed", method, path)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the log)"}

    def _route(self, method: str, path: str) -> tuple[Callable[..., Any], tuple[str, ...]]:
        allowed = []
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            if route_method == method:
                return handler, match.groups()
            allowed.append(route_method)
        if allowed:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{path} accepts {', '.join(allowed)}")
        raise ApiError(HTTPStatus.NOT_FOUND, f"no such resource: {path}")

    # ---- handlers

    def _health(self, query: Query) -> dict[str, Any]:
        health = self._port.health()
        connected = self._bridge_connected()
        if not connected:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, "not connected to the MQTT broker")
        if health["stuck"]:
            stuck = "; ".join(f"{s['kind']} {s['id']}: {s['why']}" for s in health["stuck"])
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, f"work is stuck: {stuck}")
        return {**health, "mqtt_connected": connected}

    def _devices(self, query: Query) -> Json:
        return self._port.read("devices")

    def _device(self, query: Query, device_id: str) -> Json:
        return self._port.read("device", device_id)

    def _device_adapters(self, query: Query, device_id: str) -> Json:
        return self._port.read("device_adapters", device_id)

    def _jobs(self, query: Query) -> Json:
        device = _one(query, "device")
        if device is not None and not re.fullmatch(_DEVICE, device):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"device {device!r} is not a device id")
        return self._port.read("jobs", _limit(query, 100), device)

    def _rounds(self, query: Query) -> Json:
        return self._port.read("rounds", _limit(query, 50))

    def _adapters(self, query: Query) -> Json:
        return self._port.read("adapters")

    def _adapter(self, query: Query, cohort: str, version: str) -> Json:
        return self._port.read("adapter", cohort, int(version))

    def _runs(self, query: Query) -> Json:
        return self._port.read("runs", _limit(query, 20))

    def _clusters(self, query: Query) -> Json:
        return self._port.read("clusters")

    def _dashboard_page(self, query: Query) -> Raw:
        return Raw("text/html; charset=utf-8", (STATIC_DIR / "dashboard.html").read_bytes())

    def _dashboard_state(self, query: Query) -> dict[str, Any]:
        return self.dashboard.state()

    def _dashboard_static(self, query: Query, name: str) -> Raw:
        found = static_file(name)
        if found is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        return Raw(f"{found[0]}; charset=utf-8", found[1])

    def _finetune(self, body: Body) -> dict[str, Any]:
        return self._port.request_finetune(*_selection(body))

    def _evaluate(self, body: Body) -> dict[str, Any]:
        body = dict(body)
        version = body.pop("adapter_version", None)
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or version < 0
        ):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"adapter_version" must be an integer >= 0')
        return self._port.evaluate(*_selection(body), version)

    def _promote(self, body: Body, cohort: str, version: str) -> dict[str, Any]:
        unknown = set(body) - {"force"}
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown fields {sorted(unknown)}")
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"force" must be true or false')
        return self._port.promote(cohort, int(version), force)

    def _rollback(self, body: Body, cohort: str) -> dict[str, Any]:
        cluster = body.get("cluster")
        if cluster is not None and (
            not isinstance(cluster, str) or not re.fullmatch(r"[a-z0-9]{1,16}", cluster)
        ):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"cluster" must be a cluster id such as "c1"')
        return self._port.rollback(cohort, cluster)


def _selection(body: Body) -> tuple[list[str] | None, str | None, bool]:
    """Who an operator command is for: {"devices": [...]}, {"cohort": ...} or {"all": true}."""
    unknown = set(body) - {"devices", "cohort", "all"}
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown fields {sorted(unknown)}")
    devices, cohort, all_ = body.get("devices"), body.get("cohort"), body.get("all", False)
    if devices is not None and (
        not isinstance(devices, list) or not all(isinstance(d, str) for d in devices)
    ):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"devices" must be a list of device ids')
    if cohort is not None and not isinstance(cohort, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"cohort" must be a string')
    if not isinstance(all_, bool):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"all" must be true or false')
    return devices, cohort, all_


def _json_body(body: bytes) -> Body:
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "body must be a JSON object")
    return value


def _one(query: Query, name: str) -> str | None:
    values = query.get(name)
    return None if not values else values[-1]


def _limit(query: Query, default: int) -> int:
    text = _one(query, "limit")
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"limit must be an integer in [1, {MAX_LIMIT}]")
    return int(text)


def to_json(value: Any) -> bytes:
    """Strict JSON: a non-finite float (an infinite gap, say) becomes null."""
    return json.dumps(_finite(value), allow_nan=False, sort_keys=True).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self._refused():
            return
        self._respond(*self.server.api.handle("GET", self.path))

    def do_POST(self) -> None:
        if self._refused():
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._respond(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
            return
        body = self.rfile.read(length) if length else b""
        self._respond(*self.server.api.handle("POST", self.path, body))

    def _refused(self) -> bool:
        """Answers a request its guard refuses (and closes the connection: its body is unread)."""
        refusal = check_request(self.server.guard, self)
        if refusal is None:
            return False
        self.close_connection = True
        self._respond(refusal.status, {"error": refusal.message})
        return True

    def _respond(self, status: int, payload: Any) -> None:
        raw = payload if isinstance(payload, Raw) else Raw("application/json", to_json(payload))
        data = raw.data
        self.send_response(status)
        if status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="skipfleet"')
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", raw.content_type)
        self.send_header("Cache-Control", "no-store")  # the state changes; a new build's files too
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: FleetApi, addr: str, port: int, guard: RequestGuard) -> None:
        super().__init__((addr, port), _Handler)
        self.api = api
        self.guard = guard
        # the dashboard's history fills while nobody watches, so a page opened late has it
        self._sampler = HistorySampler(api.dashboard.sample)
        self._thread = threading.Thread(target=self.serve_forever, name="api", daemon=True)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        self._thread.start()
        self._sampler.start()

    def stop(self) -> None:
        self._sampler.stop()
        self.shutdown()
        self.server_close()
