"""`skipfleet coordinator` as a child process, and a small client of its HTTP API.

Used by `skipfleet simulate` and `skipfleet bench coordinator`. The API and /metrics ports are
chosen here (free ports on 127.0.0.1) and passed on the command line, so nothing has to be read
back from the coordinator's log. The coordinator makes its API token in its state dir on start;
the client reads it from there (coordinator.config.API_TOKEN_FILE).
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from shared.http_auth import JSON_CONTENT_TYPE, bearer_header, read_token_file
from skipfleet.brokers import free_port
from skipfleet.processes import child_env

HTTP_TIMEOUT_S = 60.0


class ApiError(RuntimeError):
    """The coordinator's API answered with an error, or did not answer."""

    def __init__(self, message: str, status: int | None = None, payload: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.payload = payload


class ApiClient:
    """JSON over HTTP with the coordinator's bearer token, read from `token_file` when a request
    is made (the coordinator writes it on its first start, so it may not exist yet)."""

    def __init__(
        self, base_url: str, timeout_s: float = HTTP_TIMEOUT_S, token_file: Path | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.token_file = token_file

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        """(status, JSON payload); ApiError if nothing (or no JSON) came back."""
        if body is None and method != "GET":
            body = {}
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": JSON_CONTENT_TYPE} if data is not None else {}
        request = urllib.request.Request(
            self.base_url + path, data=data, method=method, headers={**headers, **self._auth()}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            try:
                return err.code, json.load(err)
            except ValueError:
                return err.code, None
        # refused, timed out, not JSON, or not HTTP (BadStatusLine from a port another took)
        except (OSError, ValueError, http.client.HTTPException) as err:
            raise ApiError(f"{method} {self.base_url}{path}: {err}") from None

    def _auth(self) -> dict[str, str]:
        if self.token_file is None or not Path(self.token_file).exists():
            return {}
        return bearer_header(read_token_file(self.token_file))

    def get(self, path: str):
        return self._ok("GET", path)

    def post(self, path: str, body: dict):
        return self._ok("POST", path, body)

    def _ok(self, method: str, path: str, body: dict | None = None):
        status, payload = self.request(method, path, body)
        if status != 200:
            raise ApiError(f"{method} {path}: {status} {payload}", status, payload)
        return payload


def token_file(state_dir: Path) -> Path:
    """Where a coordinator with this state dir keeps its API token (no --api-token-file)."""
    from coordinator.config import API_TOKEN_FILE

    return Path(state_dir) / API_TOKEN_FILE


class CoordinatorProcess:
    """`skipfleet coordinator` (local Ray unless the knobs say otherwise), its output in a log."""

    def __init__(
        self,
        broker_url: str,
        state_dir: Path,
        log_path: Path,
        knobs: Sequence[str] = (),
        env: Mapping[str, str] | None = None,  # more environment (e.g. for the Ray it joins)
    ) -> None:
        self.api_port, self.metrics_port = free_port(), free_port()
        self.log_path = Path(log_path)
        self.argv = [
            sys.executable, "-m", "skipfleet.cli", "coordinator",
            "--broker", broker_url, "--state-dir", str(state_dir),
            "--api-addr", "127.0.0.1", "--api-port", str(self.api_port),
            "--metrics-addr", "127.0.0.1", "--metrics-port", str(self.metrics_port),
            *knobs,
        ]  # fmt: skip
        self.api = ApiClient(f"http://127.0.0.1:{self.api_port}", token_file=token_file(state_dir))
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            self.argv, env=child_env(**(env or {})), stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_healthy(self, timeout_s: float = 120.0) -> dict:
        """GET /health once it answers 200; RuntimeError if the process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"the coordinator exited with {code}: {self.tail()}")
            try:
                return self.api.get("/health")
            except ApiError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the coordinator not healthy in {timeout_s:.0f} s: "
                                       f"{self.tail()}") from None  # fmt: skip
                time.sleep(0.5)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read().decode()

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a clean stop: the coordinator ends its Ray too), SIGKILL after timeout_s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self._log.close()
