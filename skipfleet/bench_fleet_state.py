"""The fleet state's own costs that grow with the fleet, in process: no broker, no Ray.

`python -m skipfleet.bench_fleet_state [--devices N] [--strangers U] [--reports R]` prints:
- the periodic scan (every 5 s) of a clustered cohort of N labelled devices and U devices
  without labels whose signatures are near no cluster (placed in none, tried again each scan),
  and the CPU a new such device costs when it joins;
- a finished round's report arrays dropped (coordinator.reports.ReportStore.release): the CPU
  of storing R fan-sized reports, of dropping their arrays with SQLite's secure_delete as the
  state db sets it (FAST) and as Debian's SQLite defaults (ON), and the reports table's bytes a
  report added while its arrays were held and once they were dropped.
Figures are CPU time (time.process_time) of this process.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from coordinator.config import CoordinatorConfig
from coordinator.heap import tune_gc
from coordinator.ingest import Received
from coordinator.reports import ReportMeta, ReportStore, infer_shape
from coordinator.scheduler import SchedulerPolicy
from coordinator.service import SCAN_INTERVAL_S, FleetService
from coordinator.state_db import StateDB
from shared.mqtt import MqttSettings
from shared.protocol import Envelope, Heartbeat, Presence, PresenceState
from skipfleet.bench_driver import fan_adapter  # a fan-sized report's arrays (~12.4 KB)

BASE_HASH = "b" * 64
SIGNATURE_WIDTH = 96  # the fan model's signature rows
BATCH = 256  # messages an ingest call, as the bridge's batches


class ManualClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def cpu_seconds(run: Callable[[], object]) -> float:
    started = time.process_time()
    run()
    return time.process_time() - started


def joined(device: str, signature: np.ndarray, labelled: bool, at: float) -> list[Received]:
    """A device's presence and first heartbeat (its signature), as its agent sends them."""
    samples = 100 if labelled else 0
    presence = Presence(PresenceState.ONLINE, "boot-1", "bench", BASE_HASH, "fan",
                        train_samples=samples, holdout_samples=samples // 4)  # fmt: skip
    beat = Heartbeat(1.5, "model:bench", 10.0, 0, 0, 0, 5.0, signature=signature.astype(np.float32),
                     signature_rows=64)  # fmt: skip
    return [Received(Envelope(m, sender=device, boot_id="boot-1", seq=i + 1), at)
            for i, m in enumerate((presence, beat))]  # fmt: skip


def ingest_all(service: FleetService, messages: Iterable[Received]) -> None:
    batch: list[Received] = []
    for message in messages:
        batch.append(message)
        if len(batch) == BATCH:
            service.ingest(batch)
            batch = []
    if batch:
        service.ingest(batch)


def scan(devices: int, strangers: int, state_dir: Path) -> dict[str, float]:
    clock = ManualClock()
    policy = SchedulerPolicy(max_concurrent_jobs=devices)
    config = CoordinatorConfig(mqtt=MqttSettings("localhost"), state_dir=state_dir,
                               metrics_port=0, api_port=0, policy=policy)  # fmt: skip
    service = FleetService(config, clock=clock)
    rng = np.random.default_rng(0)
    quiet = 0.05 * rng.standard_normal((devices, SIGNATURE_WIDTH))
    ingest_all(service, (m for i in range(devices)
                         for m in joined(f"fan-{i:05d}", quiet[i], True, clock())))  # fmt: skip
    service.request_finetune(all_=True)  # clusters the cohort on the labelled signatures
    far = 5.0 + 0.05 * rng.standard_normal((strangers, SIGNATURE_WIDTH))
    join = cpu_seconds(
        lambda: ingest_all(
            service,
            (m for i in range(strangers) for m in joined(f"far-{i:05d}", far[i], False, clock())),
        )
    )
    scans = []
    for _ in range(3):
        clock.now += SCAN_INTERVAL_S
        scans.append(cpu_seconds(service.tick))
    service.close()
    return {"join_ms_per_device": 1e3 * join / max(1, strangers), "scan_s": min(scans)}


def release(reports: int, state_dir: Path, secure_delete: str) -> dict[str, float]:
    db = StateDB(state_dir / f"release-{secure_delete}.sqlite3")
    db.execute(f"PRAGMA secure_delete={secure_delete}")
    store = ReportStore(db, state_dir)
    arrays = fan_adapter(np.random.default_rng(1))
    shape = infer_shape("bench", arrays)
    figures: dict[str, float] = {}
    for index in range(2):  # the second round reuses the pages the first one's release freed
        round_id = f"round-{index}"
        metas = [ReportMeta(f"{round_id}-{i}", f"dev-{i:05d}", round_id, "fan", BASE_HASH, 100,
                            shape, None, 1.0) for i in range(reports)]  # fmt: skip

        def save(metas=metas) -> None:
            with db.transaction():
                for meta in metas:
                    store.save(meta, arrays, checked_on_receipt=False)

        before = _table_bytes(db)
        figures[f"save_s_{index}"] = cpu_seconds(save)
        held = _table_bytes(db)

        def drop(round_id=round_id) -> None:
            with db.transaction():
                store.release(round_id)

        figures[f"release_s_{index}"] = cpu_seconds(drop)
        figures["bytes_per_report_held"] = (held - before) / reports
        figures["bytes_per_report_released"] = (_table_bytes(db) - before) / reports
    db.close()
    return figures


def _table_bytes(db: StateDB) -> int:
    row = db.query_one("SELECT sum(pgsize) FROM dbstat WHERE name LIKE '%fit_reports%'")
    return int(row[0] or 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=6000, help="labelled, clustered devices")
    parser.add_argument("--strangers", type=int, default=1000,
                        help="devices without labels near no cluster")  # fmt: skip
    parser.add_argument(
        "--reports", type=int, default=10_000, help="reports in a round (0: no release figures)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        found = scan(args.devices, args.strangers, Path(tmp))
        print(f"scan of {args.devices:,} clustered devices and {args.strangers:,} near no "
              f"cluster: {found['scan_s']:.3f} s CPU; a new such device joining: "
              f"{found['join_ms_per_device']:.1f} ms CPU")  # fmt: skip
        for mode in ("FAST", "ON") if args.reports else ():
            r = release(args.reports, Path(tmp), mode)
            print(f"secure_delete {mode}: {args.reports:,} reports stored in {r['save_s_0']:.2f} s "
                  f"(again, into freed pages: {r['save_s_1']:.2f} s), their arrays dropped in "
                  f"{r['release_s_0']:.3f} / {r['release_s_1']:.3f} s; reports table "
                  f"{r['bytes_per_report_held']:,.0f} B a report held, "
                  f"{r['bytes_per_report_released']:,.0f} B dropped")  # fmt: skip
    return 0


if __name__ == "__main__":
    tune_gc()  # as the fleet actor runs (not in a caller's process: its collector is its own)
    raise SystemExit(main())
