"""`skipfleet bench agent`: what a device pays to run the agent, measured.

- Report bytes: each data set's adapter as float32 / float16 / int8 against the whole model.
- Agent resident memory (VmRSS) idle and while fine-tuning (peak, VmHWM): a Pi Zero 2 W has
  512 MB.
- Spool writes: bytes the agent's SQLite writes (write() calls: WAL, checkpoints) for a float32
  report (alone, and with the fleet adapter's frozen ΔW) spooled then acknowledged, with the
  spool's own secure_delete (FAST) and with ON (Debian's and Raspberry Pi OS's SQLite default):
  an SD card's wear.
- End-to-end job latency on loopback through a private mosquitto: job published → SUCCEEDED
  status received, for an evaluate job (the round trip) and for a fine-tune with the paper's
  epochs (round trip + training).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from agent.data import load_fan_task
from agent.data.fmnist_tasks import load_fmnist_task
from agent.data.har import har_drift_split
from agent.device_data import write_device_file
from agent.spool import Priority, Spool
from agent.trainer.adapter import Adapter
from agent.trainer.base_models import finetune
from agent.trainer.cnn.finetune import pretrain_cnn
from shared.mqtt import parse_broker_url
from shared.protocol import encode
from shared.protocol.enums import ArrayEncoding, JobKind, PresenceState
from shared.protocol.messages import (
    EvaluateParams,
    FinetuneParams,
    Job,
    Presence,
    Report,
    ReportMetrics,
)
from skipfleet.base_model import pretrain_calibrated, stream_ids
from skipfleet.bench_trainer import DEFAULT_LR, PAPER_EPOCHS
from skipfleet.brokers import MosquittoBroker
from skipfleet.probe import FleetProbe
from skipfleet.processes import AgentProcess, rss_bytes

WAIT_S = 120.0
CNN_DATASET = "fmnist-rot75"  # a camera device: the CNN on rotated Fashion-MNIST
EPOCHS = {**PAPER_EPOCHS, CNN_DATASET: 10}
LR = {**DEFAULT_LR, CNN_DATASET: 0.02}
CNN_DEVICE_IMAGES = 1365  # 1,024 to train on after the agent's 25 % hold-out


def load(data_dir: Path, dataset: str):
    if dataset == "har":
        return har_drift_split(data_dir, standardize=False)
    if dataset == CNN_DATASET:
        return load_fmnist_task(data_dir, dataset, n_finetune=CNN_DEVICE_IMAGES)
    return load_fan_task(data_dir, dataset)


def pretrained(dataset: str, task, log):
    pre = task.pretrain
    if dataset == CNN_DATASET:  # the fine-tune is measured here, not drift: no calibration
        return pretrain_cnn(pre.X, pre.y, pre.n_classes, epochs=2)
    return pretrain_calibrated(pre.X, pre.y, pre.n_classes, stream_ids(pre), epochs=30, seed=0,
                               log=log)  # fmt: skip


def report_bytes(model, adapter) -> dict:
    """Encoded size of a report carrying the adapter in each encoding, and the whole model."""
    metrics = ReportMetrics(0.5, 0.9, 100, 10, 1.0, 1.0, "model:pi-zero-2w", 0.9,
                            model.weights_hash, "skip2-lora", 4)  # fmt: skip
    out = {}
    for encoding in ArrayEncoding:
        message = Report("bench", adapter.to_arrays(), metrics, encoding=encoding)
        out[encoding.value] = len(encode(message, sender="bench-device", boot_id="b", seq=1))
    # a device that started from a fleet adapter ships its frozen deltas with its new factors
    later = Adapter(adapter.layer_dims, adapter.n_classes, adapter.frozen().deltas, adapter.factors)
    message = Report("bench", later.to_arrays(), metrics)
    out["float32_with_fleet_deltas"] = len(
        encode(message, sender="bench-device", boot_id="b", seq=1)
    )
    whole = Report("bench", dict(model.params), metrics)  # what shipping a fine-tuned model costs
    out["whole_model_float32"] = len(encode(whole, sender="bench-device", boot_id="b", seq=1))
    return out


class AgentUnderTest:
    """A private broker, one agent process, and a probe playing the coordinator."""

    def __init__(self, workdir: Path, model_path: Path, data_path: Path):
        self.broker = MosquittoBroker(workdir / "broker")
        self.broker.start()
        self.probe = FleetProbe(parse_broker_url(self.broker.url), "bench-probe")
        self.agent = AgentProcess("bench-dev", self.broker.url, data_path, model_path,
                                  workdir / "state", workdir / "agent.log",
                                  ("--heartbeat-seconds", "5"))  # fmt: skip
        self.probe.wait_for(
            lambda t, e, r: (
                isinstance(e.message, Presence) and e.message.state is PresenceState.ONLINE
            ),
            WAIT_S,
        )

    def run_job(self, kind: JobKind, params) -> tuple[float, int]:
        """(seconds from publish to SUCCEEDED (a fine-tune's report), peak RSS meanwhile)."""
        job = Job(uuid.uuid4().hex, kind, params, expires_at=time.time() + WAIT_S)
        sent = self.probe.send_job("bench-dev", job)
        peak = 0
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(self.agent.pid)[0])
            try:
                _, arrived = self.probe.job_succeeded(job.job_id, 0.05)
                return arrived - sent, peak
            except TimeoutError:
                continue
        raise TimeoutError(f"{kind.value} job did not succeed within {WAIT_S} s")

    def close(self):
        self.agent.stop()
        self.probe.close()
        self.broker.stop()


def measure_agent(dataset: str, task, model, workdir: Path, jobs: int, log) -> dict:
    model_path, data_path = workdir / "base.npz", workdir / "device.npz"
    model.save(model_path)
    write_device_file(data_path, task.finetune)
    run = AgentUnderTest(workdir, model_path, data_path)
    try:
        time.sleep(2.0)  # let start-up allocations settle before reading the idle figure
        idle_rss = rss_bytes(run.agent.pid)[0]
        evaluate = [run.run_job(JobKind.EVALUATE, EvaluateParams())[0] for _ in range(jobs)]
        params = FinetuneParams(epochs=EPOCHS[dataset], lr=LR[dataset], seed=0)
        tunes = [run.run_job(JobKind.FINETUNE, params) for _ in range(jobs)]
        peak_rss = max(rss_bytes(run.agent.pid)[1], *(rss for _, rss in tunes))
        log(f"{dataset}: idle {idle_rss / 2**20:.1f} MiB, peak {peak_rss / 2**20:.1f} MiB")
    finally:
        run.close()
    return {
        "idle_rss_bytes": idle_rss,
        "finetune_peak_rss_bytes": peak_rss,
        "evaluate_latency_seconds": summary([s for s in evaluate]),
        "finetune_latency_seconds": summary([s for s, _ in tunes]),
        "finetune_epochs": EPOCHS[dataset],
        "device_samples": len(task.finetune),
    }


def spool_bytes_written(payload_bytes: int, secure_delete: str | None, reports: int = 300) -> float:
    """Bytes written (the process's write() calls) a report of this size spooled then
    acknowledged, as the agent does: with the spool's own secure_delete (None), or this one."""
    payload = np.random.default_rng(0).bytes(payload_bytes)
    with tempfile.TemporaryDirectory(prefix="skipfleet-bench-") as tmp:
        spool = Spool(Path(tmp) / "spool.sqlite", max_messages=reports + 1)
        if secure_delete is not None:
            spool.run(lambda db: db.execute(f"PRAGMA secure_delete={secure_delete}"))
        before = _bytes_written()
        for _ in range(reports):
            item = spool.put("skipfleet/bench/report", payload, priority=Priority.RECORD)
            assert item is not None  # a record is stored or SpoolFull raised
            spool.ack(item)
        written = _bytes_written() - before
        spool.close()
    return written / reports


def _bytes_written() -> int:
    with open("/proc/self/io") as io:  # Linux: wchar, bytes passed to write() and its kin
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}


def main(args) -> int:
    def log(message):
        print(message, file=sys.stderr, flush=True)

    results = {}
    for dataset in args.datasets.split(","):
        if dataset not in EPOCHS:
            raise ValueError(f"unknown dataset {dataset!r}: damage1, damage2, har or {CNN_DATASET}")
        task = load(args.data_dir, dataset)
        log(f"{dataset}: pre-training and fine-tuning once for the report sizes")
        model = pretrained(dataset, task, log)
        adapter = finetune(model, task.finetune.X, task.finetune.y, epochs=EPOCHS[dataset],
                           lr=LR[dataset]).adapter  # fmt: skip
        entry = {"report_bytes": report_bytes(model, adapter)}
        entry["spool_bytes_written"] = {
            f"{report}_{mode or 'spool'}": spool_bytes_written(entry["report_bytes"][report], mode)
            for report in ("float32", "float32_with_fleet_deltas")
            for mode in (None, "ON")
        }
        with tempfile.TemporaryDirectory(prefix="skipfleet-bench-") as tmp:
            entry.update(measure_agent(dataset, task, model, Path(tmp), args.jobs, log))
        results[dataset] = entry
    output = {"datasets": results, "jobs_per_kind": args.jobs, "numpy": np.__version__}
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(output, indent=2) + "\n")
    return 0


def format_table(results: dict) -> str:
    lines = [
        f"{'dataset':12s} {'f32 B':>7s} {'f16 B':>7s} {'int8 B':>7s} {'+fleet B':>8s} "
        f"{'model B':>8s} {'idle MiB':>8s} {'peak MiB':>8s} {'eval s':>7s} {'tune s':>7s} "
        f"{'spool B':>8s} {'if ON':>7s} {'+fleet spool B':>14s} {'if ON':>7s}"
    ]
    for name, r in results.items():
        b = r["report_bytes"]
        lines.append(
            f"{name:12s} {b['float32']:7d} {b['float16']:7d} {b['int8']:7d} "
            f"{b['float32_with_fleet_deltas']:8d} {b['whole_model_float32']:8d} "
            f"{r['idle_rss_bytes'] / 2**20:8.1f} {r['finetune_peak_rss_bytes'] / 2**20:8.1f} "
            f"{r['evaluate_latency_seconds']['median']:7.3f} "
            f"{r['finetune_latency_seconds']['median']:7.3f} "
            + " ".join(
                f"{r['spool_bytes_written'][key]:{width},.0f}"
                for key, width in (
                    ("float32_spool", 8),
                    ("float32_ON", 7),
                    ("float32_with_fleet_deltas_spool", 14),
                    ("float32_with_fleet_deltas_ON", 7),
                )
            )
        )
    return "\n".join(lines)
