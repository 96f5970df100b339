"""The fleet state's own costs that grow with the fleet, in process: no broker, no Ray.

`python -m skipfleet.bench_fleet_state [--devices N] [--strangers U] [--reports R]
[--round-devices D]` prints:
- the fleet state's CPU a device for a whole round over D devices, as the coordinator
  benchmark's (a tenth of the cohort canaries, fan-sized skip2-lora reports as the load
  generator's, a heartbeat a device): its ingest and its ticks alone, the floor under what a
  real coordinator spends on a round, and its SQL statements a device;
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
import itertools
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.clock import ManualClock
from coordinator.config import CoordinatorConfig
from coordinator.federation import FederationPolicy
from coordinator.heap import tune_gc
from coordinator.ingest import Received
from coordinator.outbound import Outbound
from coordinator.reports import ReportMeta, ReportStore, check_values, infer_shape
from coordinator.rollout import RolloutPolicy
from coordinator.round_arrays import FOLDER
from coordinator.scheduler import SchedulerPolicy
from coordinator.service import SCAN_INTERVAL_S, FleetService
from coordinator.state_db import StateDB
from shared.mqtt import MqttSettings
from shared.protocol import (
    DesiredState,
    Envelope,
    Heartbeat,
    Job,
    JobKind,
    JobState,
    JobStatus,
    Presence,
    PresenceState,
    Report,
    ReportMetrics,
)
from skipfleet.bench_driver import fan_adapter, lora_adapter  # a fan-sized report's arrays
from skipfleet.measure import cpu_seconds

BASE_HASH = "b" * 64
SIGNATURE_WIDTH = 96  # the fan model's signature rows
BATCH = 256  # messages an ingest call, as the bridge's batches


def joined(device: str, signature: np.ndarray | None, labelled: bool, at: float) -> list[Received]:
    """A device's presence and first heartbeat (its signature, if any), as its agent sends them."""
    samples = 100 if labelled else 0
    presence = Presence(PresenceState.ONLINE, "boot-1", "bench", BASE_HASH, "fan",
                        train_samples=samples, holdout_samples=samples // 4)  # fmt: skip
    return [Received(Envelope(m, sender=device, boot_id="boot-1", seq=i + 1), at)
            for i, m in enumerate((presence, heartbeat(signature)))]  # fmt: skip


def heartbeat(signature: np.ndarray | None = None) -> Heartbeat:
    vector = None if signature is None else signature.astype(np.float32)
    return Heartbeat(1.5, "model:bench", 10.0, 0, 0, 0, 5.0, signature=vector,
                     signature_rows=None if vector is None else 64)  # fmt: skip


def ingest_all(service: FleetService, messages: Iterable[Received]) -> None:
    batch: list[Received] = []
    for message in messages:
        batch.append(message)
        if len(batch) == BATCH:
            service.ingest(batch)
            batch = []
    if batch:
        service.ingest(batch)


def fleet_state(devices: int, state_dir: Path, clock: ManualClock, **policy: Any) -> FleetService:
    """A fleet state that sends every job at once, with no automatic trigger."""
    scheduling = SchedulerPolicy(max_concurrent_jobs=devices, accuracy_threshold=None,
                                 accuracy_drop_margin=None, drift_threshold=None)  # fmt: skip
    config = CoordinatorConfig(mqtt=MqttSettings("localhost"), state_dir=state_dir,
                               metrics_port=0, api_port=0, policy=scheduling,
                               **policy)  # fmt: skip
    return FleetService(config, clock=clock)


def scan(devices: int, strangers: int, state_dir: Path) -> dict[str, float]:
    clock = ManualClock()
    service = fleet_state(devices, state_dir / "scan", clock)
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
        clock.advance(SCAN_INTERVAL_S)
        scans.append(cpu_seconds(service.tick))
    service.close()
    return {"join_ms_per_device": 1e3 * join / max(1, strangers), "scan_s": min(scans)}


class Devices:
    """The messages a round asks of each simulated device, stamped as its agent would."""

    def __init__(self, count: int, clock: ManualClock) -> None:
        self.ids = [f"dev-{i:05d}" for i in range(count)]
        self._clock = clock
        self._seq = dict.fromkeys(self.ids, 10)  # past their joins' 1 and 2
        # the load generator's reports carry a skip2-lora adapter: the A and B factors alone
        self._arrays = lora_adapter(fan_adapter(np.random.default_rng(2)))

    def received(self, device: str, message: object) -> Received:
        """As the bridge hands it over: a report with its checks' verdict, made beside the fleet
        state (coordinator.bridge; python -m skipfleet.bench_driver counts it)."""
        self._seq[device] += 1
        envelope = Envelope(message, sender=device, boot_id="boot-1", seq=self._seq[device])
        checked = None
        if isinstance(message, Report):
            checked = check_values(device, message.adapter, message.metrics.samples)
        return Received(envelope, self._clock(), checked)

    def answers(self, outbound: Iterable[Outbound]) -> list[Received]:
        """Each device's answer to the jobs among `outbound`: a fine-tune's report, an
        evaluation's accuracy (the candidate better), an offered adapter applied."""
        answers = []
        for o in outbound:
            job = o.message.apply_job() if isinstance(o.message, DesiredState) else o.message
            if not isinstance(job, Job):
                continue
            if job.kind is JobKind.FINETUNE:
                metrics = ReportMetrics(0.6, 0.9, 100, 5, 2.0, 3.0, "model:bench", 0.5,
                                        BASE_HASH, "skip2-lora", 4)  # fmt: skip
                message: object = Report(job.job_id, self._arrays, metrics)
            elif job.kind is JobKind.EVALUATE:
                accuracy = 0.9 if job.params.adapter_version else 0.85  # 0: the base model
                message = JobStatus(job.job_id, JobState.SUCCEEDED, detail={"accuracy": accuracy})
            else:
                message = JobStatus(job.job_id, JobState.SUCCEEDED)
            answers.append(self.received(o.device_id, message))
        return answers


def round_cpu(devices: int, state_dir: Path) -> dict[str, float]:
    """The fleet state's CPU a device for a round as the coordinator benchmark's (a tenth of
    the cohort canaries; a heartbeat a device), from the request until every device applied
    the promoted version: its ingest and its ticks alone, not the making of the messages."""
    clock = ManualClock()
    rollout = RolloutPolicy(canary_fraction=0.1, max_accuracy_regression=0.02)
    service = fleet_state(devices, state_dir / "round", clock, rollout=rollout,
                          federation=FederationPolicy(max_rounds=1))  # fmt: skip
    fleet = Devices(devices, clock)
    ingest_all(service, (m for d in fleet.ids for m in joined(d, None, True, clock())))
    spent = {"ingest": 0.0, "ticks": 0.0}

    def ingest(messages: list[Received]) -> None:
        spent["ingest"] += cpu_seconds(lambda: ingest_all(service, messages))

    def tick() -> list[Outbound]:
        out: list[Outbound] = []
        spent["ticks"] += cpu_seconds(lambda: out.extend(service.tick()))
        clock.advance(0.5)
        return out

    counted = itertools.count()
    for index in range(3):  # the first warms up, the second is timed, the third counted
        spent = dict.fromkeys(spent, 0.0)
        if index == 2:  # the connection the actor's one working thread uses
            service.fleet.db.trace(lambda sql: next(counted))
        play_round(service, fleet, index + 1, ingest, tick)
        if index == 1:
            timed = {part: 1e3 * seconds / devices for part, seconds in spent.items()}
    service.close()
    return timed | {"statements": next(counted) / devices}


def play_round(
    service: FleetService,
    fleet: Devices,
    version: int,
    ingest: Callable[[list[Received]], None],
    tick: Callable[[], list[Outbound]],
) -> None:
    """A heartbeat a device, then a round from the request until every device applied the
    promoted `version`, through these two steps of the fleet state."""
    ingest([fleet.received(d, heartbeat()) for d in fleet.ids])
    service.request_finetune(all_=True)
    outbound = tick()
    while outbound or service.health()["open_rounds"]:
        ingest(fleet.answers(outbound))
        outbound = tick()
    versions = {d["adapter_version"] for d in service.devices()}
    if versions != {version}:
        raise RuntimeError(f"round {version} did not end on every device: {versions}")


def release(reports: int, state_dir: Path, secure_delete: str) -> dict[str, float]:
    state_dir = state_dir / f"release-{secure_delete}"
    db = StateDB(state_dir / "state.sqlite3")
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
        figures["file_bytes_per_report"] = _folder_bytes(state_dir / FOLDER) / reports

        def drop(round_id=round_id) -> None:
            with db.transaction():
                store.release(round_id)

        figures[f"release_s_{index}"] = cpu_seconds(drop)
        figures["bytes_per_report_held"] = (held - before) / reports
        figures["bytes_per_report_released"] = (_table_bytes(db) - before) / reports
    db.close()
    return figures


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir()) if folder.is_dir() else 0


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
    parser.add_argument("--round-devices", type=int, default=5000,
                        help="devices in the whole round measured (0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        found = scan(args.devices, args.strangers, Path(tmp))
        print(f"scan of {args.devices:,} clustered devices and {args.strangers:,} near no "
              f"cluster: {found['scan_s']:.3f} s CPU; a new such device joining: "
              f"{found['join_ms_per_device']:.1f} ms CPU")  # fmt: skip
        if args.round_devices:
            cost = round_cpu(args.round_devices, Path(tmp))
            print(f"a round over {args.round_devices:,} devices, the fleet state's CPU a device: "
                  f"ingest {cost['ingest']:.3f} ms + ticks {cost['ticks']:.3f} ms = "
                  f"{cost['ingest'] + cost['ticks']:.3f} ms; {cost['statements']:.1f} SQL "
                  "statements a device")  # fmt: skip
        for mode in ("FAST", "ON") if args.reports else ():
            r = release(args.reports, Path(tmp), mode)
            print(f"secure_delete {mode}: {args.reports:,} reports stored in {r['save_s_0']:.2f} s "
                  f"(again, into freed pages: {r['save_s_1']:.2f} s), their arrays dropped in "
                  f"{r['release_s_0']:.3f} / {r['release_s_1']:.3f} s; reports table "
                  f"{r['bytes_per_report_held']:,.0f} B a report held, "
                  f"{r['bytes_per_report_released']:,.0f} B dropped; its round's arrays file "
                  f"{r['file_bytes_per_report']:,.0f} B a report")  # fmt: skip
    return 0


if __name__ == "__main__":
    tune_gc()  # as the fleet actor runs (not in a caller's process: its collector is its own)
    raise SystemExit(main())
