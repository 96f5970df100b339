"""The scenarios of `skipfleet bench faults` that need real processes (skipfleet.faults_fleet):
a round through a broker SIGKILL, a coordinator kill -9, a device's network outage; an API
called without the token or as a browser's simple request; client-id takeover attempts.

Per round: "lost" is a device of the round whose report is not in it (every device is honest
and running, and the round's deadline outlasts the fault); "twice" is reports the coordinator
took beyond one per device that answered (its skipfleet_finetune_duration_seconds_count, one
per report taken, summed over the coordinator processes of the round).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from coordinator.config import CoordinatorConfig
from shared.mqtt import MqttSettings
from skipfleet.deploy_broker import DeployBroker, Mqtt
from skipfleet.faults_fleet import DUPLICATES, LiveFleet, wait_for
from skipfleet.faults_table import Row
from skipfleet.fleet.proxy import CutMode
from skipfleet.measure import by_label, parse_prometheus

ROUND_TIMEOUT_S = 600.0
METRICS_LAG_S = 5.0

Fault = Callable[[LiveFleet, dict], tuple[float, dict]]  # -> when recovery starts, details


def fault_round(fleet: LiveFleet, scenario: str, injected: str, fault: Fault,
                sessions_older_than_s: float = 0.0) -> Row:  # fmt: skip
    """`injected` may name the fault's details, e.g. {sessions_age_s:.0f}."""
    wait_for("every device online", fleet.online)
    wait_for("a quiet fleet", fleet.settled)
    time.sleep(max(0.0, sessions_older_than_s - (time.monotonic() - fleet.sessions_since)))
    reports_before = fleet.reports_taken()
    (opened,) = fleet.api().post("/finetune", {"all": True})["rounds"]
    since, detail = fault(fleet, opened)
    record = wait_for(
        "the round to end", lambda: _ended(fleet, opened["round_id"]), ROUND_TIMEOUT_S
    )
    recover_s = time.monotonic() - since
    wait_for("every device online again", fleet.online)
    wait_for("the round's canary and installs", fleet.settled)
    time.sleep(METRICS_LAG_S)  # the coordinator's counters are updated every 2 s
    answered = record["answered"] or []
    reports = fleet.reports_taken() - reports_before
    dropped = by_label(parse_prometheus(fleet.coordinator.metrics()), DUPLICATES, "reason")
    lost = len(opened["devices"]) - len(answered)
    twice = max(0, round(reports) - len(answered))
    detail |= {
        "stage": record["stage"],
        "answered": answered,
        "failures": record["failures"],
        "reports_taken": reports,
        "messages_dropped_by_reason": dropped,
        "results_sent_again": _sent_again(fleet, opened["round_id"]),
    }
    held = lost == 0 and twice == 0 and record["stage"] == "STORED"
    return Row(
        scenario,
        injected.format(**detail),
        reports_lost=lost,
        applied_twice=twice,
        recover_s=recover_s,
        held=held,
        detail=detail,
    )


def _sent_again(fleet: LiveFleet, round_id: str) -> int:
    """Results of the round's jobs the agents sent again, asked by the coordinator (their logs:
    agent.repeats); the coordinator applies such a copy only if the first one was lost."""
    jobs = fleet.jobs_in(round_id, "SUCCEEDED", "FAILED", "REJECTED")
    logs = {
        name: agent.log_path.read_text(errors="replace") for name, agent in fleet.agents.items()
    }
    return sum(logs[j["device_id"]].count(f"job {j['job_id']} asked again: its") for j in jobs)


def _ended(fleet: LiveFleet, round_id: str) -> dict | None:
    record = fleet.round(round_id)
    return record if record and record["stage"] not in ("RUNNING", "AGGREGATING") else None


def _mid_round(fleet: LiveFleet, opened: dict, state: str) -> dict:
    """Waits until a job of the round is in `state` while the round is still open."""
    wait_for(f"a job {state}", lambda: fleet.jobs_in(opened["round_id"], state))
    record = fleet.round(opened["round_id"])
    done = fleet.jobs_in(opened["round_id"], "SUCCEEDED")
    return {"round_stage_at_fault": record["stage"], "reports_in_at_fault": len(done)}


def broker_sigkill(fleet: LiveFleet, opened: dict) -> tuple[float, dict]:
    detail = _mid_round(fleet, opened, "IN_PROGRESS")
    since = time.monotonic()
    # mosquitto writes its sessions every autosave_interval (10 s, deploy/mosquitto): a session
    # made less than that before a SIGKILL is not in the snapshot it restarts from
    detail["sessions_age_s"] = since - fleet.sessions_since
    fleet.broker.kill()
    time.sleep(2.0)  # down for a moment, as a crashed broker restarted by its supervisor
    fleet.broker.start()
    fleet.sessions_since = time.monotonic()  # the clients reconnect: new sessions, or old ones
    return since, detail


def broker_sigkill_reports_held(fleet: LiveFleet, opened: dict) -> tuple[float, dict]:
    """The worst case of young sessions, made on purpose: the coordinator's link is cut while
    the devices train, so every report is acknowledged by the broker (gone from its agent's
    spool) and waits in the coordinator's session when mosquitto is SIGKILLed; the agents are
    back on the restarted broker before the coordinator. Its session may come back (made more
    than the autosave interval before the kill) but not the reports queued in it since."""
    detail = _mid_round(fleet, opened, "IN_PROGRESS")
    fleet.coordinator_link.cut(CutMode.REFUSE)
    open_jobs = fleet.jobs_in(opened["round_id"], "IN_PROGRESS", "QUEUED")
    jobs = {job["device_id"]: job["job_id"] for job in open_jobs}

    def all_acknowledged() -> bool:
        return all(fleet.acknowledged(device, job) for device, job in jobs.items())

    wait_for("every report acknowledged by the broker", all_acknowledged, ROUND_TIMEOUT_S)
    since = time.monotonic()
    detail |= {"sessions_age_s": since - fleet.sessions_since, "reports_held": len(jobs)}
    fleet.broker.kill()
    time.sleep(2.0)
    fleet.broker.start()
    time.sleep(5.0)  # the agents reconnect (backoff at most 2 s) before the coordinator
    fleet.coordinator_link.restore()
    fleet.sessions_since = time.monotonic()
    return since, detail


def coordinator_kill9(fleet: LiveFleet, opened: dict) -> tuple[float, dict]:
    """Killed while the devices train: their reports come while no coordinator runs."""
    detail = _mid_round(fleet, opened, "IN_PROGRESS")
    since = time.monotonic()
    detail |= fleet.kill_coordinator()
    fleet.coordinator = fleet.start_coordinator()
    return since, detail


def outage(seconds: float) -> Fault:
    def cut(fleet: LiveFleet, opened: dict) -> tuple[float, dict]:
        victim = sorted(opened["devices"])[-1]
        detail = _mid_round(fleet, opened, "IN_PROGRESS") | {"device": victim}
        fleet.links[victim].cut(CutMode.BLACKHOLE)
        time.sleep(seconds)
        detail["offline_seen"] = not _device(fleet, victim)["online"]
        fleet.links[victim].restore()
        return time.monotonic(), detail

    return cut


def _device(fleet: LiveFleet, name: str) -> dict:
    return next(d for d in fleet.api().get("/devices") if d["device_id"] == name)


# -- the operator API ---------------------------------------------------------------------------
def _attempts(base: str, cohort: str, token: str) -> list[tuple[str, str, bytes, dict]]:
    """(what, path, body, headers): mutating calls without the token, with a wrong one, or as
    a browser's simple (CSRF-able) request; the last ones carry the token as text/plain."""
    body = json.dumps({"all": True}).encode()
    promote = f"/adapters/{cohort}/1/promote"
    return [
        ("no token", "/finetune", body, {"Content-Type": "application/json"}),
        (
            "wrong token",
            "/finetune",
            body,
            {"Content-Type": "application/json", "Authorization": "Bearer " + "x" * 43},
        ),
        (
            "form post (CSRF)",
            "/finetune",
            b"all=true",
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
        ("text/plain post (CSRF)", "/finetune", body, {"Content-Type": "text/plain"}),
        (
            "text/plain with token",
            "/finetune",
            body,
            {"Content-Type": "text/plain", "Authorization": f"Bearer {token}"},
        ),
        ("promote, no token", promote, b'{"force": true}', {"Content-Type": "application/json"}),
        (
            "rollback, no token",
            f"/adapters/{cohort}/rollback",
            b"{}",
            {"Content-Type": "application/json"},
        ),
        ("evaluate, no token", "/evaluate", body, {"Content-Type": "application/json"}),
    ]


def _post(url: str, body: bytes, headers: dict) -> int:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _state(fleet: LiveFleet) -> str:
    api = fleet.api()
    return json.dumps([api.get("/jobs"), api.get("/rounds"), api.get("/adapters")], sort_keys=True)


def api_attacks(fleet: LiveFleet) -> Row:
    wait_for("every device online", fleet.online)
    wait_for("a quiet fleet", fleet.settled)
    cohort = fleet.api().get("/devices")[0]["cohort"]
    token = fleet.api().token_file.read_text().strip()
    before = _state(fleet)
    answers = {
        what: _post(fleet.api().base_url + path, body, headers)
        for what, path, body, headers in _attempts("", cohort, token)
    }
    time.sleep(1.0)  # a change, had one been made, is visible by now (ticks are 0.2 s)
    changed = _state(fleet) != before
    accepted = [what for what, status in answers.items() if 200 <= status < 300]
    changes = len(accepted) + (1 if changed and not accepted else 0)
    return Row(
        "operator API without the token",
        f"{len(answers)} mutating calls: no token, wrong token, simple (CSRF) requests",
        recover_s=None,
        held=changes == 0,
        detail={
            "answers": answers,
            "state_changed": changed,
            "unauthenticated_state_changes": changes,
        },
    )


# -- client ids -------------------------------------------------------------------------------
def takeover(fleet: LiveFleet, commands: int = 10) -> Row:
    """A device account with no agent asks for the live coordinator's client id and a running
    device's; then for the id of an offline device whose commands wait in its session."""
    wait_for("every device online", fleet.online)
    port, passwords = fleet.broker.port, fleet.passwords
    attacker, owner = fleet.spare_accounts
    coordinator_id = CoordinatorConfig(MqttSettings("x"), fleet.state_dir).client_id
    pid_before = fleet.api().get("/health")["pid"]
    victim = sorted(fleet.agents)[0]
    opened = []
    for stolen in (coordinator_id, victim, "coordinator"):
        mqtt = Mqtt(port, stolen, attacker, passwords[attacker])
        mqtt.connect()
        opened.append(mqtt)
    time.sleep(3.0)  # a kicked device would be offline by now (its Will has no delay)
    kicked = [victim] if not _device(fleet, victim)["online"] else []
    same = fleet.coordinator.process.poll() is None and fleet.api().get("/health")["pid"] == (
        pid_before
    )
    kicked += [] if same else ["coordinator"]
    for mqtt in opened:
        mqtt.close()
    # On a second broker of the same config and accounts: sending commands takes the coordinator
    # account, whose one session (client id = user name) is the live coordinator's.
    probe = DeployBroker(fleet.root / "probe-broker", fleet.root / "secrets" / "mosquitto_passwd")
    try:
        queued = _queued_commands(probe.port, passwords, attacker, owner, commands)
    finally:
        probe.stop()
    detail = {
        "kicked": kicked,
        "queued_commands_sent": commands,
        "queued_commands_received": queued,
        "coordinator_same_pid": same,
    }
    return Row(
        "client-id takeover",
        "a device account connects as the coordinator, a running "
        f"device, and an offline device with {commands} queued commands",
        held=not kicked and queued == commands,
        detail=detail,
    )


def _queued_commands(port: int, passwords: dict, attacker: str, owner: str, n: int) -> int:
    """Commands published for an offline device (persistent session) that reach it after
    another device account connected with its client id and a clean start."""
    device = Mqtt(port, owner, owner, passwords[owner])
    device.connect(session_expiry_s=600)
    device.subscribe(f"fleet/{owner}/cmd/probe")
    device.close()
    sender = Mqtt(port, "bench-faults-sender", "coordinator", passwords["coordinator"])
    sender.connect()
    for k in range(n):
        sender.publish(f"fleet/{owner}/cmd/probe", f"command {k}".encode())
    sender.close()
    thief = Mqtt(port, owner, attacker, passwords[attacker])
    thief.connect()  # a clean start under the owner's id: were it granted, the queue is gone
    thief.close()
    device = Mqtt(port, owner, owner, passwords[owner])
    device.connect(session_expiry_s=600)
    got = len(device.received(5.0, n))
    device.close()
    return got
