"""The HTTP JSON control endpoint of a process fleet, served by the process that owns it.

Bound to 127.0.0.1 (port 0: the kernel picks one, published in fleet.json). It kills and pauses
processes, so it takes the coordinator API's rules (shared.http_auth): a POST needs the bearer
token of `control-token` in the fleet's run dir (made there, mode 0600) and a JSON content type;
reads are open to loopback.

    GET  /devices                      {"devices": [row, ...]}
    GET  /devices/{id}                 {"device": row}
    POST /devices/{id}/{verb}          verb: kill pause resume cut restore restart
                                       (cut takes an optional body {"mode": "refuse"|"blackhole"})
    POST /broker/{cut|restore}         {"devices": [...]}; cut takes {"mode": ...} too
    POST /scale  {"devices": N}        {"devices": [...]}

Every POST that succeeds is appended to events.jsonl in the run dir (runstate.log_event): the
coordinator's dashboard shows them on its timeline (`--fleet-events-file`).

Errors are JSON `{"error": message, "code": code}`: 400 invalid_request (bad verb, mode, N or
JSON), 401 unauthorized (no or a wrong token), 404 unknown_device / not_found, 405
method_not_allowed, 409 state_conflict / unsupported, 415 unsupported_media_type (not JSON),
503 unavailable (the fleet is stopped), 500 fleet_error.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from shared.http_auth import RequestGuard, check_request, ensure_token_file
from skipfleet.fleet.base import (
    CutMode,
    DeviceStateError,
    FleetError,
    FleetUnavailable,
    InvalidRequest,
    UnknownDevice,
    Unsupported,
    Verb,
    apply_verb,
    check_count,
    parse_enum,
)
from skipfleet.fleet.runstate import CONTROL_TOKEN_FILE, log_event

if TYPE_CHECKING:
    from skipfleet.fleet.supervisor import ProcessFleet

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
REFUSAL_CODES = {
    HTTPStatus.UNAUTHORIZED: "unauthorized",
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
}


class NotFound(FleetError):
    code = "not_found"


class MethodNotAllowed(FleetError):
    code = "method_not_allowed"


STATUS = {
    InvalidRequest: HTTPStatus.BAD_REQUEST,
    UnknownDevice: HTTPStatus.NOT_FOUND,
    NotFound: HTTPStatus.NOT_FOUND,
    MethodNotAllowed: HTTPStatus.METHOD_NOT_ALLOWED,
    DeviceStateError: HTTPStatus.CONFLICT,
    Unsupported: HTTPStatus.CONFLICT,
    FleetUnavailable: HTTPStatus.SERVICE_UNAVAILABLE,
}


class ControlServer:
    def __init__(self, fleet: ProcessFleet, host: str = "127.0.0.1", port: int = 0) -> None:
        self.fleet = fleet
        self.token_file = fleet.run_dir / CONTROL_TOKEN_FILE
        guard = RequestGuard(ensure_token_file(self.token_file), f"in the file {self.token_file}")
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.fleet = fleet  # the handlers find it here
        self._server.guard = guard
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="skipfleet-control", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ControlServer:
        self._thread.start()
        self.fleet.set_control_url(self.url)
        return self

    def stop(self) -> None:
        """Idempotent: the owner may stop it early and again on the way out."""
        if self._server.fileno() < 0:
            return
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self.fleet.set_control_url(None)

    def __enter__(self) -> ControlServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    server_version = "skipfleet-fleet/1"

    def do_GET(self) -> None:  # http.server's naming
        self._respond(self._get)

    def do_POST(self) -> None:
        self._respond(self._post)

    def _not_allowed(self) -> None:
        self._respond(self._refuse_method)

    do_PUT = do_DELETE = do_PATCH = _not_allowed

    def log_message(self, format: str, *args: object) -> None:
        log.debug("control %s: " + format, self.client_address[0], *args)

    # -- routing -----------------------------------------------------------------------------
    def _get(self, parts: list[str]) -> dict:
        fleet: ProcessFleet = self.server.fleet
        match parts:
            case ["devices"]:
                return {"devices": [d.to_json() for d in fleet.devices()]}
            case ["devices", device_id]:
                return {"device": fleet.device(device_id).to_json()}
            case ["devices", _, _] | ["broker", _] | ["scale"]:
                raise MethodNotAllowed(f"use POST for /{'/'.join(parts)}")
        raise NotFound(f"no such resource: GET /{'/'.join(parts)}")

    def _post(self, parts: list[str]) -> dict:
        fleet: ProcessFleet = self.server.fleet
        body = self._body()
        match parts:
            case ["devices", device_id, verb]:
                verb = parse_enum(Verb, verb, "verb")
                info = apply_verb(fleet, verb, device_id, _mode(body))
                log_event(fleet.run_dir, verb.value, device_id)
                return {"device": info.to_json()}
            case ["broker", "cut"]:
                rows = _rows(fleet.cut_broker(_mode(body) or CutMode.BLACKHOLE))
                log_event(fleet.run_dir, "cut-broker", None)
                return rows
            case ["broker", "restore"]:
                rows = _rows(fleet.restore_broker())
                log_event(fleet.run_dir, "restore-broker", None)
                return rows
            case ["broker", verb]:
                raise InvalidRequest(f"unknown broker verb {verb!r}: one of cut, restore")
            case ["scale"]:
                count = check_count(body.get("devices"))
                rows = _rows(fleet.scale(count))
                log_event(fleet.run_dir, f"scale to {count}", None)
                return rows
            case ["devices"] | ["devices", _]:
                raise MethodNotAllowed(f"use GET for /{'/'.join(parts)}")
        raise NotFound(f"no such resource: POST /{'/'.join(parts)}")

    def _refuse_method(self, parts: list[str]) -> dict:
        raise MethodNotAllowed(f"{self.command} is not served: use GET or POST")

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise InvalidRequest(f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as err:
            raise InvalidRequest(f"the body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body

    def _respond(self, route) -> None:
        parts = [unquote(p) for p in urlsplit(self.path).path.split("/") if p]
        refusal = check_request(self.server.guard, self)
        try:
            if refusal is not None:  # before the body is read or anything is touched
                self.close_connection = True
                status = refusal.status
                payload = {"error": refusal.message, "code": REFUSAL_CODES[refusal.status]}
            else:
                status, payload = HTTPStatus.OK, route(parts)
        except FleetError as err:
            status = STATUS.get(type(err), HTTPStatus.INTERNAL_SERVER_ERROR)
            payload = {"error": str(err), "code": err.code}
        except Exception as err:  # a bug: the client gets a 500 and the traceback is logged
            log.exception("control request %s %s failed", self.command, self.path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": repr(err), "code": "bug"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _mode(body: dict) -> CutMode | None:
    mode = body.get("mode")
    return None if mode is None else parse_enum(CutMode, mode, "cut mode")


def _rows(devices) -> dict:
    return {"devices": [d.to_json() for d in devices]}
