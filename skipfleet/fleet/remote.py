"""`RemoteFleet`: the fleet interface over a process fleet's HTTP control endpoint."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

from shared.http_auth import JSON_CONTENT_TYPE, TokenFileError, bearer_header, read_token_file
from skipfleet.fleet.base import (
    ERRORS,
    CutMode,
    DeviceInfo,
    FleetError,
    FleetUnavailable,
    InvalidRequest,
)

# Restart and scale wait for agents to stop (up to the fleet's stop timeout, 20 s by default).
TIMEOUT_S = 60.0


class RemoteFleet:
    """token_file: the endpoint's `control-token` (its changes need it; reads do not)."""

    def __init__(
        self, url: str, timeout_s: float = TIMEOUT_S, token_file: Path | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": JSON_CONTENT_TYPE}
        if token_file is not None:
            try:
                self.headers.update(bearer_header(read_token_file(token_file)))
            except TokenFileError as err:
                raise InvalidRequest(str(err)) from None

    def devices(self) -> list[DeviceInfo]:
        return _rows(self._call("GET", "/devices"))

    def device(self, device_id: str) -> DeviceInfo:
        return DeviceInfo.from_json(self._call("GET", f"/devices/{_id(device_id)}")["device"])

    def kill(self, device_id: str) -> DeviceInfo:
        return self._verb(device_id, "kill")

    def pause(self, device_id: str) -> DeviceInfo:
        return self._verb(device_id, "pause")

    def resume(self, device_id: str) -> DeviceInfo:
        return self._verb(device_id, "resume")

    def cut(self, device_id: str, mode: CutMode = CutMode.BLACKHOLE) -> DeviceInfo:
        return self._verb(device_id, "cut", {"mode": CutMode(mode).value})

    def restore(self, device_id: str) -> DeviceInfo:
        return self._verb(device_id, "restore")

    def restart(self, device_id: str) -> DeviceInfo:
        return self._verb(device_id, "restart")

    def cut_broker(self, mode: CutMode = CutMode.BLACKHOLE) -> list[DeviceInfo]:
        return _rows(self._call("POST", "/broker/cut", {"mode": CutMode(mode).value}))

    def restore_broker(self) -> list[DeviceInfo]:
        return _rows(self._call("POST", "/broker/restore"))

    def scale(self, n: int) -> list[DeviceInfo]:
        return _rows(self._call("POST", "/scale", {"devices": n}))

    def _verb(self, device_id: str, verb: str, body: dict | None = None) -> DeviceInfo:
        answer = self._call("POST", f"/devices/{_id(device_id)}/{verb}", body)
        return DeviceInfo.from_json(answer["device"])

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=self.headers)  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise _error(err) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise FleetUnavailable(f"no fleet control endpoint at {self.url}: {reason}") from None


def _error(err: urllib.error.HTTPError) -> FleetError:
    """The server's JSON error as the matching FleetError subclass."""
    try:
        payload = json.loads(err.read())
        message, code = payload["error"], payload.get("code")
    except (ValueError, KeyError, TypeError):
        return FleetError(f"HTTP {err.code} from the control endpoint: {err.reason}")
    return ERRORS.get(code, FleetError)(message)


def _id(device_id: str) -> str:
    return quote(device_id, safe="")


def _rows(answer: dict) -> list[DeviceInfo]:
    return [DeviceInfo.from_json(row) for row in answer["devices"]]
