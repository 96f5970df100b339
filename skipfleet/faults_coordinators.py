"""Two `skipfleet coordinator` processes on one compose broker (deploy/mosquitto config, ACL and
accounts made by make-accounts.sh, run by a real mosquitto): with an account each, and on one
account. A scenario of `skipfleet bench faults`.

The broker has no devices: a coordinator that joins the fight takes messages off the shared
session while it lasts, which would disturb the live fleet's own scenarios. "Takeovers" are
mosquitto's own count: the lines it logs when a connection closes an older one of its client id.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from skipfleet.coordinator_process import ApiError, CoordinatorProcess
from skipfleet.deploy_broker import DeployBroker, make_accounts
from skipfleet.faults_table import Row

TAKEOVER_LINE = "already connected, closing old connection"
SECOND = "second"  # the second coordinator's instance, and its account coordinator-second
FIGHT_LIMIT_S = 180.0  # start-up (its own Ray) and the fight, with a wide margin
SAMPLE_S = 0.5


class Probe:
    """The compose broker, its accounts, and coordinators started on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secrets = root / "secrets"
        make_accounts(1, self.secrets, coordinators=[SECOND])
        self.broker = DeployBroker(root / "broker", self.secrets / "mosquitto_passwd")
        self.started: list[CoordinatorProcess] = []

    def start(self, account: str, name: str) -> CoordinatorProcess:
        secret = self.secrets / f"{account}_password"
        knobs = ["--username", account, "--password-file", str(secret),
                 "--instance", name, "--tick-seconds", "0.2"]  # fmt: skip
        process = CoordinatorProcess(self.broker.url, self.root / f"{name}-state",
                                     self.root / f"{name}.log", knobs)  # fmt: skip
        self.started.append(process)
        return process

    def takeovers(self) -> int:
        return self.broker.log().count(TAKEOVER_LINE)

    def takeover_span_s(self, skip: int) -> float | None:
        """Seconds from the first to the last takeover after the first `skip`, by mosquitto's
        own time stamps (whole seconds: deploy/mosquitto's log_timestamp_format)."""
        lines = [line for line in self.broker.log().splitlines() if TAKEOVER_LINE in line][skip:]
        if not lines:
            return None
        first, last = (
            datetime.fromisoformat(line.split(": ", 1)[0]) for line in (lines[0], lines[-1])
        )
        return (last - first).total_seconds()

    def close(self) -> None:
        for process in self.started:
            process.stop()
        self.broker.stop()


def _unhealthy(process: CoordinatorProcess) -> bool:
    """/health is 200 only while the coordinator is connected to the broker (and to Ray)."""
    try:
        process.api.get("/health")
    except ApiError:
        return True
    return False


def _watch(processes: list[CoordinatorProcess], seconds: float) -> int:
    """Health samples (every SAMPLE_S, each process) that were not 200 during `seconds`."""
    bad, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        bad += sum(_unhealthy(p) for p in processes)
        time.sleep(SAMPLE_S)
    return bad


def side_by_side(probe: Probe, first: CoordinatorProcess, seconds: float) -> Row:
    second = probe.start(f"coordinator-{SECOND}", SECOND)
    second.wait_healthy()
    before = probe.takeovers()
    unhealthy = _watch([first, second], seconds)
    takeovers = probe.takeovers() - before
    second.stop()
    detail = {"seconds": seconds, "takeovers": takeovers, "unhealthy_samples": unhealthy}
    return Row(
        "two coordinators, an account each",
        f"`coordinator` and `coordinator-{SECOND}` side by side for {seconds:.0f} s",
        recover_s=None,
        held=takeovers == 0 and unhealthy == 0,
        detail=detail,
    )


def one_account(probe: Probe, first: CoordinatorProcess, after_s: float) -> Row:
    """A newcomer on the first one's account: it stops (exit 75), the first keeps the account."""
    before = probe.takeovers()
    newcomer = probe.start("coordinator", "newcomer")
    fight_began, deadline = None, time.monotonic() + FIGHT_LIMIT_S
    while newcomer.process.poll() is None and time.monotonic() < deadline:
        if fight_began is None and probe.takeovers() > before:
            fight_began = time.monotonic()  # its first connection closed the first one's
        time.sleep(0.1)
    code = newcomer.process.poll()
    fought_s = None if fight_began is None else time.monotonic() - fight_began
    fought = probe.takeovers() - before
    span = probe.takeover_span_s(before)
    unhealthy_after = _watch([first], after_s)
    after = probe.takeovers() - before - fought
    said = "MQTT account 'coordinator'" in newcomer.tail()
    alive = first.process.poll() is None
    detail = {
        "newcomer_exit_code": code,
        "first_takeover_to_newcomer_exit_s": fought_s,
        "first_to_last_takeover_s": span,
        "takeovers_while_fighting": fought,
        "takeovers_after": after,
        "first_alive": alive,
        "first_unhealthy_samples_after": unhealthy_after,
        "message_names_the_account": said,
        "watched_after_s": after_s,
    }
    held = code == 75 and said and alive and after == 0 and unhealthy_after == 0
    return Row(
        "two coordinators, one account",
        "a second `skipfleet coordinator` with the first one's account",
        recover_s=fought_s,
        held=held,
        detail=detail,
    )


def coordinators(root: Path, side_by_side_s: float = 30.0) -> list[Row]:
    probe = Probe(root)
    try:
        first = probe.start("coordinator", "first")
        first.wait_healthy()
        return [side_by_side(probe, first, side_by_side_s), one_account(probe, first, 20.0)]
    finally:
        probe.close()
