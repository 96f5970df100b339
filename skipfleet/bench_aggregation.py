"""The aggregation strategies alone, timed over N synthetic reports of realistic shape.

Shapes are HAR's (185 features → 96 → 96, 6 classes) with rank-4 factors: the largest adapter
in this project. Reports are random (N(0, 0.1) factors, 50–500 samples each) because only their
shapes and count matter to the time; each strategy runs through `run_strategy`, what a Ray task
of the coordinator runs, validation included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import numpy as np

from coordinator.aggregate_task import COMPARED_ALGORITHMS, run_strategy
from coordinator.aggregation import AdapterShape, FitResult

HAR_SHAPE = AdapterShape((185, 96, 96), 6)
RANK = 4


def synthetic_reports(count: int, shape: AdapterShape = HAR_SHAPE, seed: int = 0):
    rng = np.random.default_rng(seed)
    reports = []
    for i in range(count):
        arrays = {}
        for k, dim in enumerate(shape.layer_dims, start=1):
            arrays[f"A{k}"] = (0.1 * rng.standard_normal((dim, RANK))).astype(np.float32)
            arrays[f"B{k}"] = (0.1 * rng.standard_normal((RANK, shape.n_classes))).astype(
                np.float32
            )
        reports.append(FitResult(f"dev-{i}", arrays, int(rng.integers(50, 501))))
    return reports


def time_strategy(algorithm: str, reports: Sequence[FitResult], repeats: int) -> dict:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run = run_strategy(algorithm, HAR_SHAPE, reports, ())
        seconds.append(time.perf_counter() - started)
        if run.error is not None:
            raise RuntimeError(f"{algorithm} over {len(reports)} reports failed: {run.error}")
    median = statistics.median(seconds)
    return {
        "median_seconds": median,
        "min_seconds": min(seconds),
        "per_report_microseconds": 1e6 * median / len(reports),
        "repeats": repeats,
    }


def run(sizes: Sequence[int]) -> dict:
    out = {}
    for size in sizes:
        reports = synthetic_reports(size)
        repeats = 5 if size <= 1000 else 3
        out[str(size)] = {a: time_strategy(a, reports, repeats) for a in COMPARED_ALGORITHMS}
    return {
        "shape": {"layer_dims": list(HAR_SHAPE.layer_dims), "n_classes": HAR_SHAPE.n_classes,
                  "rank": RANK},
        "sizes": out,
    }  # fmt: skip


def format_table(result: dict) -> str:
    lines = [f"{'reports':>8s} {'exact-delta ms':>15s} {'naive-fedavg ms':>16s} "
             f"{'exact µs/report':>16s} {'naive µs/report':>16s}"]  # fmt: skip
    for size, runs in result["sizes"].items():
        exact, naive = runs["exact-delta"], runs["naive-fedavg"]
        lines.append(
            f"{int(size):8d} {1e3 * exact['median_seconds']:15.2f} "
            f"{1e3 * naive['median_seconds']:16.2f} {exact['per_report_microseconds']:16.1f} "
            f"{naive['per_report_microseconds']:16.1f}"
        )
    return "\n".join(lines)
