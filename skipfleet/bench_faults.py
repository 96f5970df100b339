"""`skipfleet bench faults`: the fault and attack scenarios of issue 10, end to end, and a table
of what each cost: reports lost, reports applied twice, honest devices harmed, time to recover.

Trust scenarios (a poisoning device over N rounds, a 1e30 report, a silent device) run the
coordinator's fleet state in this process with devices that train on real fan data
(skipfleet.faults_trust); the others run real processes: the compose broker with its ACL and
accounts, `skipfleet coordinator`, `skipfleet agent` (skipfleet.faults_live), and two
coordinators on one broker, with an account each and on one account (skipfleet.faults_coordinators).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from skipfleet import faults_coordinators, faults_live, faults_trust
from skipfleet.faults_fleet import LiveFleet
from skipfleet.faults_table import Row, render
from skipfleet.faults_world import fan_world

SNAPSHOT_S = 15.0  # older than deploy/mosquitto's autosave_interval (10 s): in its snapshot


def trust_rows(args, world, workdir: Path) -> list[Row]:
    return [
        faults_trust.repeated(
            args.repeats, lambda k: faults_trust.poisoning(world, workdir / f"run-{k}", args.rounds)
        ),
        faults_trust.repeated(
            args.repeats,
            lambda k: faults_trust.poisoning(
                world, workdir / f"run-{k}", args.rounds, "exact-delta"
            ),
        ),
        faults_trust.overflow(world, workdir),
        faults_trust.silent(world, workdir),
    ]


class Printed(list):
    """Rows that print as they come: a run that stops half-way still shows what it measured."""

    def append(self, row: Row) -> None:
        super().append(row)
        print(render([row]).splitlines()[-1], flush=True)


def live_rows(args, world, workdir: Path) -> list[Row]:
    base, files = world.save(workdir / "world")
    fleet = LiveFleet(workdir / "live", base, files[: args.devices], args.steps)
    rows: list[Row] = Printed()
    try:
        rows.append(faults_live.api_attacks(fleet))
        rows.append(faults_live.takeover(fleet))
        young = ("broker SIGKILL mid-round, young sessions", "kill -9 of mosquitto "
                 "{sessions_age_s:.0f} s after the agents started, restarted 2 s later",
                 faults_live.broker_sigkill)  # fmt: skip
        rows.append(faults_live.fault_round(fleet, *young))
        held = (
            "broker SIGKILL, reports held for the coordinator",
            "the coordinator's link cut mid-round until every report was PUBACKed; kill -9 of "
            "mosquitto {sessions_age_s:.0f} s after the sessions began, restarted 2 s later; "
            "the coordinator back 5 s after it",
            faults_live.broker_sigkill_reports_held,
        )
        rows.append(faults_live.fault_round(fleet, *held))
        old = (
            "broker SIGKILL mid-round",
            "kill -9 of mosquitto, sessions {sessions_age_s:.0f} "
            "s old (autosave: 10 s), restarted 2 s later",
            faults_live.broker_sigkill,
        )
        rows.append(faults_live.fault_round(fleet, *old, sessions_older_than_s=SNAPSHOT_S))
        scenarios = [
            ("coordinator kill -9 mid-round", "kill -9 of `skipfleet coordinator`, restarted",
             faults_live.coordinator_kill9),
            (f"agent outage {args.outage:.0f} s", f"one device's network blackholed for "
             f"{args.outage:.0f} s mid-round", faults_live.outage(args.outage)),
        ]  # fmt: skip
        for name, injected, fault in scenarios:
            rows.append(faults_live.fault_round(fleet, name, injected, fault))
    finally:
        fleet.close()
    return rows


def _rows(args, workdir: Path) -> list[Row]:
    if args.only_coordinators:
        return faults_coordinators.coordinators(workdir / "coordinators", args.side_by_side)
    world = fan_world(Path(args.data_dir), args.devices + 1, seed=args.seed)
    rows = trust_rows(args, world, workdir)
    print(render(rows), flush=True)
    if not args.skip_live:
        rows += live_rows(args, world, workdir)
        rows += faults_coordinators.coordinators(workdir / "coordinators", args.side_by_side)
    return rows


def main(args) -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        workdir = Path(args.work_dir) if args.work_dir else Path(tmp)
        try:
            rows = _rows(args, workdir)
        except (RuntimeError, TimeoutError) as err:  # FaultsError, or a process that died
            print(f"skipfleet bench faults: {err} (logs in {workdir})", file=sys.stderr)
            if not args.work_dir:
                print("rerun with --work-dir DIR to keep them", file=sys.stderr)
            return 1
    print()
    print(render(rows))
    result = {
        "rows": [r.as_dict() for r in rows],
        "settings": {k: v for k, v in vars(args).items() if k != "func"},
        "seconds": time.monotonic() - started,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    return 0 if all(r.held or r.comparison for r in rows) else 3
