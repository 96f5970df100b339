"""The live fleet of `skipfleet bench faults`: the compose broker (deploy/mosquitto config, ACL
and per-device accounts) run by a real mosquitto, `skipfleet coordinator` with its own Ray,
and `skipfleet agent` processes on real fan data, each behind its own TCP proxy so one
device's network can be cut while both ends keep running; the coordinator is behind one too.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from skipfleet.coordinator_process import ApiError, CoordinatorProcess
from skipfleet.deploy_broker import DeployBroker, make_accounts
from skipfleet.fleet.proxy import ProxyLoop
from skipfleet.measure import children_of, parse_prometheus, total
from skipfleet.processes import AgentProcess

POLL_S = 0.25
REPORTS = "skipfleet_finetune_duration_seconds_count"  # one per report the coordinator took
DUPLICATES = "skipfleet_rejected_messages_total"
COORDINATOR_KNOBS = {
    "--max-concurrent-jobs": "8",
    "--max-rounds": "1",
    "--accuracy-threshold": "off",
    "--accuracy-drop-margin": "off",
    "--drift-threshold": "off",
    "--label-free-threshold": "off",
    "--heartbeat-timeout-seconds": "10",
    "--job-timeout-seconds": "300",
    "--round-deadline-seconds": "300",  # longer than the 2-minute outage: its report counts
    "--min-completion-ratio": "0.6",
    "--canary-fraction": "1.0",
    "--canary-deadline-seconds": "300",
    "--command-timeout-seconds": "300",
    "--session-expiry-seconds": "3600",
    "--tick-seconds": "0.2",
}
AGENT_OPTIONS = {
    "--heartbeat-seconds": "2",
    "--keepalive-seconds": "10",
    "--will-delay-seconds": "0",
    "--reconnect-max-seconds": "2",
    "--session-expiry-seconds": "3600",
    "--fetch-timeout-seconds": "15",
    "--power-profile": "generic",
    # the faults strike while the devices train: a job says IN_PROGRESS as it starts
    "--in-progress-after-seconds": "0",
}


class FaultsError(RuntimeError):
    """A scenario could not be run to its end (the message says where it stopped)."""


def wait_for(what: str, check: Callable[[], object], timeout_s: float = 120.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except ApiError:
            value = None  # the coordinator is restarting: ask again
        if value:
            return value
        if time.monotonic() > deadline:
            raise FaultsError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


class LiveFleet:
    def __init__(self, root: Path, base_model: Path, data: list[Path], steps: int) -> None:
        self.root = root
        self.passwords = make_accounts(len(data) + 2, root / "secrets")
        # two accounts no agent uses: an attacker's, and an offline device's with a session
        self.spare_accounts = (f"device-{len(data)}", f"device-{len(data) + 1}")
        self.broker = DeployBroker(root / "broker", root / "secrets" / "mosquitto_passwd")
        self.proxies = ProxyLoop()
        self.coordinator_link = self.proxies.open("127.0.0.1", self.broker.port,
                                                  name="coordinator")  # fmt: skip
        self.state_dir = root / "coordinator-state"
        self.knobs = [
            *(x for kv in COORDINATOR_KNOBS.items() for x in kv),
            "--steps-per-round",
            str(steps),
            "--username",
            "coordinator",
            "--password-file",
            str(root / "secrets" / "coordinator_password"),
        ]
        self.coordinator = self.start_coordinator()
        self.links = {}
        self.agents: dict[str, AgentProcess] = {}
        for k, path in enumerate(data):
            self.start_agent(f"device-{k}", path, base_model)
        self.reports_before_restarts = 0.0  # reports counted by coordinators killed since
        self.sessions_since = time.monotonic()  # the clients' sessions were made by then

    # -- processes
    def start_coordinator(self, tries: int = 3) -> CoordinatorProcess:
        """Started and healthy. Its ports are picked free just before; on a shared machine
        another process can take one first, and then it is started again on new ones."""
        attempt = 0
        while True:
            n = len(list(self.root.glob("coordinator-*.log")))
            process = CoordinatorProcess(
                f"mqtt://127.0.0.1:{self.coordinator_link.port}",
                self.state_dir,
                self.root / f"coordinator-{n}.log",
                self.knobs,
            )
            try:
                process.wait_healthy()
                return process
            except BaseException as err:  # a coordinator not healthy is never left running
                process.stop()
                attempt += 1
                if "Address already in use" not in str(err) or attempt == tries:
                    raise

    def start_agent(self, name: str, data: Path, base_model: Path) -> None:
        secret = self.root / "secrets" / f"{name}.password"
        secret.write_text(self.passwords[name])
        link = self.proxies.open("127.0.0.1", self.broker.port, name=name)
        self.links[name] = link
        options = [
            *(x for kv in AGENT_OPTIONS.items() for x in kv),
            "--username",
            name,
            "--password-file",
            str(secret),
        ]
        self.agents[name] = AgentProcess(
            name,
            f"mqtt://127.0.0.1:{link.port}",
            data,
            base_model,
            self.root / f"{name}-state",
            self.root / f"{name}.log",
            tuple(options),
        )

    def kill_coordinator(self) -> dict:
        """kill -9 of the coordinator process alone (a crash); what it left running is ended
        here, by pid, as its service manager would. Counts of both, and its last metrics."""
        old = self.coordinator
        tree = children_of(old.pid)
        self.reports_before_restarts += total(parse_prometheus(old.metrics()), REPORTS)
        os.kill(old.pid, signal.SIGKILL)
        old.process.wait(timeout=30)
        left = [pid for pid in tree[1:] if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        return {"processes_in_its_tree": len(tree), "left_running_after_kill_9": len(left)}

    def acknowledged(self, device: str, job_id: str) -> bool:
        """The device finished the job and the broker acknowledged every record it spooled
        (read from its state dir: the job history and the spool)."""
        state_dir = self.agents[device].state_dir
        try:
            history = json.loads((state_dir / "jobs.json").read_text())
            with sqlite3.connect(state_dir / "spool.sqlite") as db:
                (records,) = db.execute("SELECT COUNT(*) FROM outbox WHERE priority = 1").fetchone()
        except (OSError, ValueError, sqlite3.Error):
            return False
        state = history.get(job_id, {}).get("state")
        return state in ("succeeded", "failed", "rejected") and records == 0

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        self.coordinator.stop()
        self.proxies.close()
        self.broker.stop()

    # -- what the coordinator says
    def api(self):
        return self.coordinator.api

    def online(self) -> bool:
        devices = self.api().get("/devices")
        return len(devices) == len(self.agents) and all(d["online"] for d in devices)

    def round(self, round_id: str) -> dict | None:
        return next((r for r in self.api().get("/rounds") if r["round_id"] == round_id), None)

    def jobs_in(self, round_id: str, *states: str) -> list[dict]:
        jobs = self.api().get("/jobs")
        return [j for j in jobs if j["round_id"] == round_id and j["state"] in states]

    def reports_taken(self) -> float:
        return self.reports_before_restarts + total(
            parse_prometheus(self.coordinator.metrics()), REPORTS
        )

    def settled(self) -> bool:
        """Nothing in flight: no open round or run, no canary deciding, no active job."""
        health = self.api().get("/health")
        runs = self.api().get("/runs")
        return (
            health["open_rounds"] == 0
            and health["aggregating_rounds"] == 0
            and health["active_jobs"] == 0
            and all(r["state"] == "DONE" for r in runs)
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
