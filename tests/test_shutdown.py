"""Clean shutdown, with real processes, checked from /proc (shared.proctree): nothing a
`skipfleet coordinator` or `skipfleet simulate` started outlives it, Ray included.

Before: a coordinator killed with SIGKILL left Ray's DashboardAgent and RuntimeEnvAgent running
(about 80 MB each, SIGTERM ignored), and `simulate` stopped with SIGTERM left its broker,
coordinator, Ray and agents running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from shared import proctree
from skipfleet.coordinator_process import CoordinatorProcess
from skipfleet.processes import child_env
from tests.byo_table import write_pump_csv
from tests.mqtt_broker import MosquittoBroker

STOP_S = 15.0  # "within seconds": generous for a 2-core machine shared by 8 helpers


def gone_within(keys: set[tuple[int, int]], seconds: float) -> set[tuple[int, int]]:
    """The processes of `keys` still alive after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(proctree.alive(key) for key in keys):
        time.sleep(0.1)
    return {key for key in keys if proctree.alive(key)}


# A parent like the coordinator: leads its group, starts its reaper, then a child that ignores
# SIGTERM (as Ray's orphaned agents do) which starts a grandchild of its own.
FAKE_COORDINATOR = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from coordinator.reaper import lead_own_process_group, start_reaper
    lead_own_process_group()
    start_reaper()
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        "time.sleep(600)"
    )
    subprocess.Popen([sys.executable, "-c", stubborn])
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_the_reaper_stops_what_a_sigkilled_parent_left_even_processes_ignoring_sigterm():
    parent = subprocess.Popen(
        [sys.executable, "-c", FAKE_COORDINATOR], env=child_env(), stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 10
        while len(tree := proctree.descendants(parent.pid)) < 3:  # reaper, child, grandchild
            assert time.monotonic() < deadline, tree
            time.sleep(0.05)
        time.sleep(2 * 0.25)  # the reaper's next look records the grandchild
        left = {p.key for p in tree}
        parent.kill()
        parent.wait()
        assert gone_within(left, STOP_S) == set()
    finally:
        parent.kill()
        parent.stdout.close()


# As a service under systemd or a container's init: the coordinator's parent adopts orphans
# (a subreaper), so a process the coordinator started through a short-lived intermediate is
# re-parented to the coordinator's own parent before the reaper ever sees it as a descendant.
SUBREAPER = textwrap.dedent(
    """
    import ctypes, subprocess, sys, time
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    subprocess.run([sys.executable, "-c", sys.argv[1]])
    time.sleep(600)
    """
)
# Starts a process through an intermediate that exits at once, then dies by SIGKILL.
COORDINATOR_WITH_A_DAEMON = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from coordinator.reaper import lead_own_process_group, start_reaper
    lead_own_process_group()
    start_reaper()
    time.sleep(1.0)  # the reaper watches
    daemon = [sys.executable, "-c", "import time; time.sleep(600)"]
    quiet = "stdin=s.DEVNULL, stdout=s.DEVNULL, stderr=s.DEVNULL"
    spawn = f"import subprocess as s; print(s.Popen({daemon!r}, {quiet}).pid)"
    pid = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True).stdout
    print(pid, end="", flush=True)
    time.sleep(1.0)  # the reaper's looks do not see it below the coordinator
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_the_reaper_stops_what_the_coordinator_left_when_its_parent_adopts_orphans():
    parent = subprocess.Popen(
        [sys.executable, "-c", SUBREAPER, COORDINATOR_WITH_A_DAEMON],
        env=child_env(),
        stdout=subprocess.PIPE,
    )
    try:
        orphan = proctree.read(int(parent.stdout.readline()))
        assert orphan is not None and orphan.ppid == parent.pid  # adopted by the subreaper
        assert gone_within({orphan.key}, STOP_S) == set()
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


@pytest.fixture
def broker(tmp_path):
    broker = MosquittoBroker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.slow
def test_a_coordinator_killed_with_sigkill_leaves_no_ray_process_running(tmp_path, broker):
    """(SIGTERM to a coordinator: simulate's stop below, which must not need its sweep.)"""
    coordinator = CoordinatorProcess(
        broker.url, tmp_path / "state", tmp_path / "coordinator.log", ["--instance", "reap"]
    )
    try:
        coordinator.wait_healthy(120)
        started = proctree.descendants(coordinator.pid)
        commands = [_cmdline(p.pid) for p in started]
        assert any("raylet" in c for c in commands), commands  # a local Ray: its own processes
        os.kill(coordinator.pid, signal.SIGKILL)
        assert coordinator.process.wait(STOP_S) == -signal.SIGKILL
        assert gone_within({p.key for p in started}, STOP_S) == set(), coordinator.tail()
    finally:
        coordinator.stop(5)


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_sigterm_to_simulate_stops_its_broker_coordinator_ray_and_agents(tmp_path):
    from skipfleet.cli import main

    table = write_pump_csv(tmp_path / "pumps.csv")
    fleet = tmp_path / "fleet"
    assert main(["prepare", "--from", str(table), "--label-column", "state",
                 "--device-column", "pump", "--holdout-devices", "pump-d,pump-e,pump-f",
                 "--hidden", "16", "--epochs", "2", "--out", str(fleet)]) == 0  # fmt: skip
    argv = [sys.executable, "-m", "skipfleet.cli", "simulate", "--fleet-dir", str(fleet),
            "--run-dir", str(tmp_path / "run"), "--runs", "5", "--timeout", "60"]  # fmt: skip
    simulate = subprocess.Popen(
        argv,
        env=child_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        progress = []
        for line in simulate.stderr:  # its progress: once the agents run, everything is up
            progress.append(line)
            if "agents started" in line:
                break
        run_dir = tmp_path / "run"  # as simulate printed it: `fleet --run-dir` takes it as is
        assert f"skipfleet fleet --run-dir {run_dir} " in line, "".join(progress)
        listed = subprocess.run(
            [sys.executable, "-m", "skipfleet.cli", "fleet", "--run-dir", str(run_dir), "ls"],
            env=child_env(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert listed.returncode == 0 and "pump-f" in listed.stdout, listed.stderr
        started = proctree.descendants(simulate.pid)
        commands = " ".join(_cmdline(p.pid) for p in started)
        for what in ("mosquitto", "coordinator", "raylet", " agent "):
            assert what in commands, (what, commands)
        simulate.send_signal(signal.SIGTERM)
        assert simulate.wait(STOP_S + 20) == 128 + signal.SIGTERM
        assert gone_within({p.key for p in started}, STOP_S) == set()
        said = simulate.stderr.read()
        assert "stopped by SIGTERM" in said
        assert "did not stop in time" not in said  # each stopped what it started: no sweep
    finally:
        simulate.kill()
        simulate.wait()
        simulate.stderr.close()
