"""The state file over many rounds, with history kept for good and with it deleted past the
retention (coordinator.history): in process, no broker, no Ray.

`python -m skipfleet.bench_history [--devices N] [--rounds R] [--every-hours H]` runs R rounds
of N devices (as skipfleet.bench_fleet_state's: a tenth of the cohort canaries, fan-sized
reports), one every H hours of a simulated clock, twice: history kept a day (the shortest
retention allowed), and kept far longer than the run. It prints, after each round, the state
file's size (its WAL checkpointed into it); the CPU of the pruning passes (the largest, and
per row deleted); and the CPU of counting the jobs by state (what the metrics snapshot does
every 2 s) at the end of each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from coordinator.clock import ManualClock
from coordinator.config import DAY_S
from coordinator.federation import FederationPolicy
from coordinator.heap import tune_gc
from coordinator.history import PRUNE_INTERVAL_S, Pruned
from coordinator.ingest import Received
from coordinator.outbound import Outbound
from coordinator.rollout import RolloutPolicy
from coordinator.service import SCAN_INTERVAL_S, FleetService
from skipfleet.bench_fleet_state import Devices, fleet_state, ingest_all, joined, play_round
from skipfleet.measure import cpu_seconds

KEPT_LONG_DAYS = 10_000.0  # longer than any run here: nothing is deleted


def run(devices: int, rounds: int, every_s: float, history_days: float, folder: Path) -> dict:
    clock = ManualClock()
    rollout = RolloutPolicy(canary_fraction=0.1, max_accuracy_regression=0.02)
    service = fleet_state(devices, folder, clock, rollout=rollout, history_s=history_days * DAY_S,
                          federation=FederationPolicy(max_rounds=1))  # fmt: skip
    passes = _timed_passes(service)
    fleet = Devices(devices, clock)
    ingest_all(service, (m for d in fleet.ids for m in joined(d, None, True, clock())))

    def ingest(messages: list[Received]) -> None:
        ingest_all(service, messages)

    sent: list[int] = []

    def tick() -> list[Outbound]:  # the broker acknowledged what the last tick handed out
        out = service.tick(acknowledged=sent)
        sent[:] = [o.seq for o in out if o.seq is not None]
        clock.advance(0.5)
        return out

    sizes = []
    for index in range(rounds):
        play_round(service, fleet, index + 1, ingest, tick)
        sizes.append(_file_bytes(service))
        _idle(service, clock, every_s, passes)
    counting = [cpu_seconds(service.fleet.jobs.count_by_state) for _ in range(20)]
    idle_ticks = []
    for _ in range(20):  # between scans (a tenth of a second apart): a round-less tick's reads
        clock.advance(0.1)
        idle_ticks.append(cpu_seconds(service.tick))
    jobs = service.fleet.db.query_one("SELECT count(*) FROM jobs")[0]
    service.close()
    return {"sizes": sizes, "passes": passes, "count_s": statistics.median(counting),
            "jobs": jobs, "tick_s": statistics.median(idle_ticks)}  # fmt: skip


def _idle(
    service: FleetService, clock: ManualClock, seconds: float, passes: list[tuple[float, Pruned]]
) -> None:
    """`seconds` with no round: a scan every SCAN_INTERVAL_S, as the coordinator's ticks make
    them, while its passes still find rows to delete; then the rest at once."""
    started = clock()
    clock.advance(min(PRUNE_INTERVAL_S, seconds))
    while clock() - started < seconds:
        ran = len(passes)
        service.tick()
        if len(passes) == ran or not passes[-1][1].total:
            clock.advance(seconds - (clock() - started))  # nothing waits: the rest of the gap
            service.tick()
        else:
            clock.advance(SCAN_INTERVAL_S)


def _timed_passes(service: FleetService) -> list[tuple[float, Pruned]]:
    """Each pruning pass the service's scans make, with its CPU (bench-only instrumentation)."""
    history = service.fleet.history
    passes: list[tuple[float, Pruned]] = []
    prune = history.prune

    def timed(cutoff: float) -> Pruned:
        found: list[Pruned] = []
        passes.append((cpu_seconds(lambda: found.append(prune(cutoff))), found[0]))
        return found[0]

    history.prune = timed  # type: ignore[method-assign]
    return passes


def _file_bytes(service: FleetService) -> int:
    db = service.fleet.db
    db.query("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = db.query_one("PRAGMA page_size")[0]
    return int(page_size * db.query_one("PRAGMA page_count")[0])


def tick_with_ended(rounds: int, devices: int, folder: Path) -> float:
    """Median CPU of a tick with no round running and no scan, over a state dir holding
    `rounds` ended rounds of `devices` devices each, with a rollout of a tenth of them as
    canaries: the rows a tick's reads of rounds and rollouts may go through."""
    clock = ManualClock()
    service = fleet_state(devices, folder, clock, history_s=KEPT_LONG_DAYS * DAY_S)
    ids = json.dumps([f"dev-{i:05d}" for i in range(devices)])
    canaries = json.dumps([f"dev-{i:05d}" for i in range(0, devices, 10)])
    now = clock()
    with service.fleet.db.transaction():
        for index in range(rounds):
            service.fleet.db.execute(
                "INSERT INTO rounds (round_id, device_ids, started_at, deadline, "
                "min_completion_ratio, cohort, outcome, closed_at) "
                "VALUES (?, ?, ?, ?, 0.8, 'fan', 'COMPLETED', ?)",
                (f"r{index}", ids, now - index, now, now),
            )
            service.fleet.db.execute(
                "INSERT INTO rollouts (rollout_id, cohort, candidate_version, previous_version, "
                "canary_devices, started_at, deadline, state, decided_at, reason, cluster) "
                "VALUES (?, 'fan', ?, NULL, ?, ?, ?, 'PROMOTED', ?, 'bench', 'all')",
                (f"o{index}", index + 1, canaries, now - index, now, now),
            )
    service.tick()  # the first tick scans
    ticks = []
    for _ in range(30):
        clock.advance(0.1)
        ticks.append(cpu_seconds(service.tick))
    service.close()
    return statistics.median(ticks)


def report(label: str, found: dict[str, Any]) -> None:
    mib = [s / 2**20 for s in found["sizes"]]
    print(f"{label}: state file after each round (MiB): " + ", ".join(f"{m:.1f}" for m in mib))
    half = len(mib) // 2
    if half:
        print(f"  grown a round over the last {half} rounds: "
              f"{(mib[-1] - mib[-1 - half]) / half:.2f} MiB")  # fmt: skip
    print(f"  jobs held at the end: {found['jobs']:,}; counting them by state: "
          f"{1e6 * found['count_s']:.1f} µs CPU; a tick with no round and no scan: "
          f"{1e3 * found['tick_s']:.2f} ms CPU")  # fmt: skip
    idle = [s for s, p in found["passes"] if not p.total]
    if idle:
        print(f"  passes that found nothing old: {len(idle)}, "
              f"{1e3 * statistics.median(idle):.3f} ms CPU each (median)")  # fmt: skip
    working = [(s, p) for s, p in found["passes"] if p.total]
    if working:
        rows = sum(p.total for _, p in working)
        slowest, its = max(working, key=lambda w: w[0])
        print(f"  passes that deleted rows: {len(working)}, {rows:,} rows in all, "
              f"{1e6 * sum(s for s, _ in working) / rows:.1f} µs CPU a row; the largest pass "
              f"{1e3 * slowest:.1f} ms for {its.as_text()}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--every-hours", type=float, default=24.0, help="between rounds")
    parser.add_argument(
        "--ended-rounds",
        type=int,
        default=0,
        help="instead: a tick's CPU over a state dir holding this many ended rounds of "
        "--devices devices (written directly; 0: the runs above)",
    )
    args = parser.parse_args(argv)
    every_s = args.every_hours * 3600
    with tempfile.TemporaryDirectory() as tmp:
        if args.ended_rounds:
            seconds = tick_with_ended(args.ended_rounds, args.devices, Path(tmp))
            print(f"a tick with no round and no scan, {args.ended_rounds:,} ended rounds of "
                  f"{args.devices:,} devices kept: {1e3 * seconds:.3f} ms CPU")  # fmt: skip
            return 0
        for label, days in (("history kept a day", 1.0), ("history kept", KEPT_LONG_DAYS)):
            found = run(args.devices, args.rounds, every_s, days, Path(tmp) / str(days))
            report(label if days == 1.0 else f"{label} for good", found)
    return 0


if __name__ == "__main__":
    tune_gc()  # as the fleet actor runs
    raise SystemExit(main())
