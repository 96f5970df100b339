"""The compose topology's pieces as local processes, for the tests that run it without Docker.

- the compose broker: deploy/mosquitto/mosquitto.conf and its ACLs, with the container's ports
  and paths rewritten into a tmp dir, and accounts made by deploy/mosquitto/make-accounts.sh;
- `skipfleet coordinator` as a child process that joins the session's Ray (`ray_session`);
- a real Prometheus scraping it, with a config derived from deploy/prometheus/prometheus.yml;
- `wait_until`: every wait is on a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import yaml

from skipfleet.brokers import free_port
from skipfleet.coordinator_process import ApiClient, ApiError, token_file
from skipfleet.deploy_broker import (  # noqa: F401 (the tests import them from here)
    DEPLOY,
    MAKE_ACCOUNTS,
    SERVICES,
    DeployBroker,
    Mqtt,
    compose_interpolate,
    listening,
    make_accounts,
)
from skipfleet.processes import child_env

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
SKIPFLEET = [sys.executable, "-m", "skipfleet.cli"]
RAY_NAMESPACE = "skipfleet-tests"  # the session's (tests/conftest.py)
WAIT = 45.0  # seconds: generous for a loaded 2-core machine; passing runs take far less


# -- waiting and child processes ---------------------------------------------------------------
class LoggedProcess:
    """A child process with its output in a log file; stop() is SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and the exit code; a process that ignores it is killed (and fails: -9)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def wait_until(
    what: str,
    check: Callable[[], object],
    *,
    timeout: float = WAIT,
    watch: Iterable = (),
    details: Callable[[], str] = lambda: "",
) -> object:
    """check()'s first truthy value. Fails at once, with its log, if a watched process (anything
    with alive() and log_path: a LoggedProcess, a skipfleet.processes.AgentProcess) exits; on a
    timeout the message has details() and the watched processes' logs."""
    watched = list(watch)
    deadline = time.monotonic() + timeout
    while True:
        for proc in watched:
            assert proc.alive(), f"{_describe(proc)} exited while waiting for {what}"
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(_describe(proc, 1500) for proc in watched)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 f"{details()}\n{logs}")  # fmt: skip
        time.sleep(0.1)


def _describe(proc, chars: int = 3000) -> str:
    name = getattr(proc, "name", None) or getattr(proc, "device_id", "a process")
    log = Path(proc.log_path).read_text(errors="replace")[-chars:]
    return f"--- {name} (exit code {proc.process.poll()}):\n{log}"


def http_json(url: str, body: dict | None = None, method: str | None = None,
              token_file: Path | None = None) -> tuple[int, object]:  # fmt: skip
    """(status, JSON) through the product's API client; ApiError if nothing answers."""
    method = method or ("GET" if body is None else "POST")
    return ApiClient(url, WAIT, token_file).request(method, "", body)


# -- the coordinator ----------------------------------------------------------------------------
def compose_flags(service: str) -> dict[str, str]:
    """The `--name=value` items of a compose service's command."""
    command = SERVICES[service]["command"]
    return dict(item[2:].split("=", 1) for item in command if item.startswith("--"))


def session_coordinator_flags(ray_session, state_dir: Path) -> dict[str, str]:
    """Flags for a coordinator on the session's Ray (under a name of its own) and free ports on
    127.0.0.1; automatic fine-tune triggers off, so only the tests start rounds."""
    return {
        "state-dir": str(state_dir),
        "ray-address": ray_session.get_runtime_context().gcs_address,
        "ray-namespace": RAY_NAMESPACE,
        "actor-name": f"topology-{uuid.uuid4().hex[:8]}",
        "api-addr": "127.0.0.1",
        "api-port": str(free_port()),
        "metrics-addr": "127.0.0.1",
        "metrics-port": str(free_port()),
        "accuracy-threshold": "off",
        "accuracy-drop-margin": "off",
        "drift-threshold": "off",
        "label-free-threshold": "off",
        "max-rounds": "1",  # a run of one round: these tests are about the deployment
        "tick-seconds": "0.2",
    }


class CoordinatorProcess(LoggedProcess):
    """`skipfleet coordinator --NAME=VALUE ...`, and its HTTP API and /metrics."""

    def __init__(self, flags: dict[str, str], log_path: Path) -> None:
        argv = [*SKIPFLEET, "coordinator", *(f"--{name}={value}" for name, value in flags.items())]
        super().__init__("coordinator", argv, log_path, child_env())
        self.api_url = f"http://127.0.0.1:{flags['api-port']}"
        self.metrics_address = f"127.0.0.1:{flags['metrics-port']}"
        self.token_file = Path(flags.get("api-token-file") or token_file(flags["state-dir"]))

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        return http_json(self.api_url + path, body, method, self.token_file)

    def get(self, path: str):
        status, payload = self.api("GET", path)
        assert status == 200, (path, status, payload)
        return payload

    def healthy(self) -> bool:
        try:
            return self.api("GET", "/health")[0] == 200
        except ApiError:  # not listening yet
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=WAIT) as r:
            return r.read().decode()


def devices_reachable(coordinator: CoordinatorProcess, device_ids: Iterable[str]) -> bool:
    """Online with a heartbeat: `online` alone is the retained presence, and a device that has
    not sent a heartbeat yet is skipped by POST /finetune as `heartbeat_stale`."""
    devices = {d["device_id"]: d for d in coordinator.get("/devices")}
    return all(
        d in devices and devices[d]["online"] and devices[d]["last_heartbeat_at"] is not None
        for d in device_ids
    )


def run_one_round(coordinator: CoordinatorProcess, device_ids: list[str],
                  watch: Iterable[LoggedProcess] = ()) -> dict:  # fmt: skip
    """POST /finetune {"all": true} over the reachable fleet (a run of one round: the session
    flags say --max-rounds 1), then wait until its adapter is promoted and every device has
    answered the offer (installed it, or kept what measured better on its own hold-out);
    returns the cohort (GET /adapters)."""
    status, started = coordinator.api("POST", "/finetune", {"all": True})
    assert status == 200, started
    (started_round,) = started["rounds"]
    assert sorted(started_round["devices"]) == sorted(device_ids), started
    watch = [coordinator, *watch]

    def promoted() -> dict | None:
        # A failed round or a rolled back canary never gets there: say so at once.
        assert all(r["stage"] != "FAILED" for r in coordinator.get("/rounds")), "round failed"
        cohorts = coordinator.get("/adapters")
        rollouts = [r for c in cohorts for r in c["rollouts"]]
        assert all(r["state"] != "ROLLED_BACK" for r in rollouts), rollouts
        return next((c for c in cohorts if c["current_version"] is not None), None)

    cohort = wait_until("the round's adapter promoted", promoted, watch=watch)
    wait_until(  # each device was offered its cluster's version
        "every device's answer to the version offered to it",
        lambda: all(
            d["offered_version"] is not None and d["offer_result"] in ("installed", "declined")
            for d in coordinator.get("/devices")
        ),
        watch=watch,
    )
    wait_until("the run done", lambda: coordinator.get("/runs")[0]["state"] == "DONE", watch=watch)
    return cohort


# -- Prometheus ---------------------------------------------------------------------------------
SCRAPE_SECONDS = 1


def prometheus_config(coordinator_address: str) -> dict:
    """deploy/prometheus/prometheus.yml scraping `coordinator_address` every second, with its
    alert rules (paths relative to the deployed config, here made absolute) evaluated as often."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    seconds = f"{SCRAPE_SECONDS}s"
    config["global"].update(
        scrape_interval=seconds, scrape_timeout=seconds, evaluation_interval=seconds
    )
    config["rule_files"] = [str(PROMETHEUS_YML.parent / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    assert static["targets"] == ["coordinator:9464"], "the compose target changed"
    static["targets"] = [coordinator_address]
    return config


class PrometheusServer(LoggedProcess):
    """The `prometheus` binary on a free 127.0.0.1 port, its config and TSDB in `root`."""

    def __init__(self, root: Path, config: dict) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed: run `make system-deps`")
        root.mkdir(parents=True, exist_ok=True)
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            binary, f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
        ]  # fmt: skip
        super().__init__("prometheus", argv, root / "prometheus.log", dict(os.environ))
        wait_until("Prometheus ready", self._ready, timeout=20, watch=[self])

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> object:
        """GET /api/v1/{path}; the `data` of a success, AssertionError with the error if not."""
        status, answer = http_json(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}")
        assert status == 200 and answer["status"] == "success", (path, params, answer)
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        return data["result"] if data["resultType"] == "vector" else [{"value": data["result"]}]


# ---- fixtures shared by the modules that run a fleet; each module defines coordinator_flags


@pytest.fixture(scope="module")
def prometheus(coordinator_flags, tmp_path_factory) -> Iterator[PrometheusServer]:
    """Prometheus scraping the coordinator's metrics address, up before the coordinator as in
    compose (it first scrapes about 5 s after its start, from its first discovery update)."""
    address = f"127.0.0.1:{coordinator_flags['metrics-port']}"
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), prometheus_config(address))
    yield server
    assert server.stop() == 0, server.log_tail()  # a clean stop: SIGTERM, TSDB closed


@pytest.fixture(scope="module")
def coordinator(coordinator_flags, prometheus) -> Iterator[CoordinatorProcess]:
    # Prometheus (a dependency only for the order) runs through the whole life of the fleet.
    log = Path(coordinator_flags["state-dir"]).parent / "coordinator.log"
    coordinator = CoordinatorProcess(coordinator_flags, log)
    wait_until("the coordinator's /health", coordinator.healthy, watch=[coordinator])
    yield coordinator
    assert coordinator.stop() == 0, coordinator.log_tail()
