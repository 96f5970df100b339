"""The coordinator's reaper: when the coordinator is gone, so is every process it started.

    python -m coordinator.reaper --watch PID

A clean stop ends the local Ray with ray.shutdown(). A coordinator killed with SIGKILL (the OOM
killer, `kill -9`) cannot: Ray's gcs_server and raylet die with it, but its DashboardAgent and
RuntimeEnvAgent notice the raylet's death, log "Raylet is dead", and stay running (about 80 MB
each, SIGTERM ignored; Ray issue 52385 "Agent process does not die after raylet dies" is open).
Ray offers no option to fate-share them with the driver, hence this small stdlib-only process:

- started by the coordinator before ray.init, in the coordinator's process group, which the
  coordinator leads (coordinator.cli makes it so), and ignoring SIGINT/SIGTERM/SIGHUP so a
  Ctrl-C or `kill -- -PGID` reaching the whole group cannot end it before its work is done;
- every POLL_S it records the coordinator's descendants (orphans are re-parented to init, so
  they must be known before the coordinator dies);
- when the coordinator has exited, it stops (SIGTERM, then SIGKILL) those it recorded that still
  run and the other members of the coordinator's process group (not its siblings there when
  the reaper started: `skipfleet coordinator | tee log` keeps its tee), then exits. Siblings are
  told apart by who they were at the start, not by their parent: under systemd or a container's
  init the coordinator's parent also adopts its orphans, so they share its parent.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from shared import proctree

POLL_S = 0.25


def reaper_argv(pid: int) -> list[str]:
    return [sys.executable, "-m", "coordinator.reaper", "--watch", str(pid)]


def start_reaper() -> subprocess.Popen[bytes]:
    """The reaper of this process (which must lead its process group), as a child of it."""
    return subprocess.Popen(reaper_argv(os.getpid()), stdin=subprocess.DEVNULL, close_fds=True)


def lead_own_process_group() -> None:
    """Make this process the leader of a process group of its own, so everything it starts can
    be found by group. A process started from a shell, by systemd or as a container's PID 1
    already leads its group: nothing changes, and a terminal's Ctrl-C still reaches it."""
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)


def watch(pid: int) -> list[int]:
    """Wait until `pid` is gone, then stop what it left behind; returns the pids stopped."""
    target = proctree.read(pid)
    if target is None:
        return []
    me = os.getpid()
    leader = target.pgid == pid  # only then is the whole group ours to stop
    # the coordinator's siblings in its group (a shell pipeline's `tee`), started with it
    siblings = {p.key for p in proctree.group(pid) if p.ppid == target.ppid and p.pid != pid}
    seen: set[tuple[int, int]] = set()
    while proctree.alive(target.key):
        procs = proctree.snapshot()
        seen |= {p.key for p in proctree.descendants(pid, procs) if p.pid != me}
        running = keys(procs)
        seen = {key for key in seen if key in running}  # forget those that ended
        time.sleep(POLL_S)
    left = set(seen)
    if leader:  # also those started after the last look, re-parented since; not the
        # coordinator's siblings in a shell pipeline (`skipfleet coordinator | tee log`)
        left |= {p.key for p in proctree.group(pid) if p.pid != me and p.key not in siblings}
    return proctree.terminate(left)


def keys(procs: dict[int, proctree.Proc]) -> set[tuple[int, int]]:
    return {proc.key for proc in procs.values()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coordinator.reaper", description=__doc__.split("\n")[0])
    parser.add_argument("--watch", type=int, required=True, metavar="PID")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    stopped = watch(args.watch)
    if stopped:
        print(
            f"skipfleet coordinator reaper: the coordinator (pid {args.watch}) is gone; stopped "
            f"{len(stopped)} process(es) it left running: {' '.join(map(str, stopped))}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
