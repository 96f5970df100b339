"""`skipfleet bench drift`: how well each label-free drift score finds *harmful* drift.

Per seed, a base model is pre-trained and calibrated exactly as the simulated fleet's is
(skipfleet/base_model.py: a fifth of each stream's blocks held out for the thresholds), except
that another fifth of the blocks is kept out of both pre-training and calibration: the
negatives. Windows are what a device scores: WINDOW_ROWS contiguous rows of one stream
(a recording, a person) in time order, wrapping round at its end, one every STRIDE rows.

- negatives: windows of those kept-out in-distribution rows;
- drifted: windows of drifted streams (fan: the noisy room's recordings; HAR: subjects the
  model never saw, NEW_SUBJECTS of the 30 drawn per seed);
- harmful: the drifted windows on which the base model's accuracy is more than MARGIN below its
  accuracy on the negatives' rows (its in-distribution accuracy);
- fan only, other recording: windows of the quiet rooms' second recordings, which neither
  pre-training nor calibration use: what the simulation's undrifted fan devices stream.
For each score: AUROC harmful vs negatives and all drifted vs negatives, per seed (a score
divided by a constant has the same AUROC) and pooled over seeds (where the calibration's
per-model scale matters), and how often each calibrated score exceeds 1.0 (its threshold).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.drift import WINDOW_ROWS, score_window
from agent.drift_calibration import STRIDE_ROWS, cyclic_windows
from skipfleet.base_model import EVERY, held_out_blocks, pretrain_calibrated, streams_of

DATASETS = ("fan", "har")
MARGIN = 0.05  # accuracy points below in-distribution that make a drifted window harmful
NEW_SUBJECTS = 10
NEGATIVE_PHASE = 3  # blocks 3, 8, 13, ... of a stream (calibration takes 1, 6, 11, ...)
BN1_COORDINATOR_THRESHOLD = 2.0  # the coordinator's drift threshold on the BN1 score today
# score name -> (what it is, whether it is a calibrated form the heartbeat sends)
SCORES = {
    "bn1": "BN1 mean squared z (heartbeat drift_score)",
    "confidence": "mean 1 - max softmax",
    "entropy": "mean normalised entropy",
    "mahalanobis": "mean squared Mahalanobis / H, last hidden layer",
    "confidence_score": "confidence / calibrated threshold (heartbeat)",
    "feature_score": "mahalanobis / calibrated threshold (heartbeat)",
    "max_score": "max(confidence_score, feature_score)",
}
THRESHOLDS = {"bn1": BN1_COORDINATOR_THRESHOLD, "confidence_score": 1.0, "feature_score": 1.0,
              "max_score": 1.0}  # fmt: skip
# other trigger levels of the calibrated scores (1.0 = the calibrated threshold), in the JSON
LEVELS = (0.5, 0.75, 1.5, 2.0, 3.0)


@dataclass(frozen=True)
class DriftData:
    """Rows with stream ids; which rows the model may learn from, which drifted."""

    X: np.ndarray
    y: np.ndarray
    streams: np.ndarray  # (n,) stream id; a stream's rows are in time order
    pool: np.ndarray  # bool (n,): in-distribution rows offered for pre-training
    drifted: np.ndarray  # bool (n,)
    other: np.ndarray  # bool (n,): in-distribution rows of another recording (may be empty)
    n_classes: int
    description: str


def load_fan(data_dir) -> DriftData:
    from agent.data import load_fan_fleet_group
    from agent.data.fan_fleet import FAN_FLEET_GROUP_NAMES

    groups = [load_fan_fleet_group(data_dir, g) for g in range(len(FAN_FLEET_GROUP_NAMES))]
    group = np.concatenate([np.full(len(ds), g) for g, ds in enumerate(groups)])
    recording = np.concatenate([ds.meta["recording"] for ds in groups])
    noisy = np.concatenate([np.full(len(ds), ds.meta["room"] == "noisy") for ds in groups])
    return DriftData(
        X=np.concatenate([ds.X for ds in groups]),
        y=np.concatenate([ds.y for ds in groups]),
        streams=group * 10 + recording,
        pool=~noisy & (recording == 0),
        drifted=noisy,
        other=~noisy & (recording == 1),
        n_classes=3,
        description="fan fleet: quiet rooms' first recordings pre-train (as simulate's); "
        "drifted = the noisy room's recordings (3 groups x 2)",
    )


def load_har(data_dir, seed: int, windows_cache: dict) -> DriftData:
    from agent.data import load_har_windows, window_features

    if "har" not in windows_cache:
        data = load_har_windows(data_dir)
        windows_cache["har"] = (data, window_features(data.windows))
    data, features = windows_cache["har"]
    new = np.random.default_rng(seed).choice(np.arange(1, 31), NEW_SUBJECTS, replace=False)
    drifted = np.isin(data.subject, new)
    return DriftData(
        X=features,
        y=data.y,
        streams=data.subject,
        pool=~drifted,
        drifted=drifted,
        other=np.zeros(len(data.y), dtype=bool),
        n_classes=6,
        description=f"HAR: {30 - NEW_SUBJECTS} subjects pre-train; drifted = {NEW_SUBJECTS} "
        f"subjects the model never saw (drawn per seed; this seed: {sorted(new.tolist())})",
    )


def auroc(negatives, positives) -> float | None:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U / n m)."""
    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    if len(neg) == 0 or len(pos) == 0:
        return None
    values = np.concatenate([neg, pos])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # 1-based rank of each distinct value's first
    ranks = (first_rank + (counts - 1) / 2)[inverse]  # ties share their mean rank
    u = ranks[len(neg) :].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def window_table(model, X, y, streams, rows) -> dict[str, np.ndarray]:
    """Every score and the base model's accuracy, one entry per window of `rows`' streams."""
    table: dict[str, list] = {name: [] for name in (*SCORES, "accuracy")}
    for stream in streams_of(rows, streams):
        for window in cyclic_windows(len(stream), WINDOW_ROWS, STRIDE_ROWS):
            picked = stream[window]
            s = score_window(model, X[picked])
            table["accuracy"].append(model.accuracy(X[picked], y[picked]))
            values = {"bn1": s.bn1_mean_squared_z, "confidence": s.confidence,
                      "entropy": s.prediction_entropy, "mahalanobis": s.feature,
                      "confidence_score": s.confidence_score, "feature_score": s.feature_score,
                      "max_score": max(s.confidence_score, s.feature_score)}  # fmt: skip
            for name, value in values.items():
                table[name].append(value)
    return {name: np.asarray(values, dtype=float) for name, values in table.items()}


def run_seed(data: DriftData, seed: int, pretrain_epochs: int, log) -> dict:
    pool = np.flatnonzero(data.pool)
    negative_local = held_out_blocks(data.streams[pool], phase=NEGATIVE_PHASE)
    model = pretrain_calibrated(data.X[pool], data.y[pool], data.n_classes, data.streams[pool],
                                epochs=pretrain_epochs, seed=seed, unused=negative_local,
                                log=log)  # fmt: skip
    negative_rows = pool[negative_local]
    in_accuracy = model.accuracy(data.X[negative_rows], data.y[negative_rows])
    parts = {"negatives": negative_rows, "drifted": np.flatnonzero(data.drifted),
             "other": np.flatnonzero(data.other)}  # fmt: skip
    tables = {
        name: window_table(model, data.X, data.y, data.streams, rows)
        for name, rows in parts.items()
        if len(rows)
    }
    harmful = tables["drifted"]["accuracy"] < in_accuracy - MARGIN
    other_harmful = (
        tables["other"]["accuracy"] < in_accuracy - MARGIN if "other" in tables else None
    )
    return {
        "seed": seed,
        "in_distribution_accuracy": in_accuracy,
        "windows": {name: len(t["accuracy"]) for name, t in tables.items()},
        "harmful_windows": int(harmful.sum()),
        # the other recording's windows on which the model is as much worse: drift too
        "other_harmful_windows": None if other_harmful is None else int(other_harmful.sum()),
        "drifted_window_accuracy_median": float(np.median(tables["drifted"]["accuracy"])),
        "thresholds": {
            "confidence": model.calibration.confidence_threshold,
            "feature": model.calibration.feature_threshold,
        },
        "tables": tables,
        "harmful": harmful,
        "other_harmful": other_harmful,
    }


def seed_metrics(run: dict) -> dict:
    """AUROCs and threshold rates of one seed, per score."""
    t, harmful = run["tables"], run["harmful"]
    out = {}
    for name in SCORES:
        neg, drifted = t["negatives"][name], t["drifted"][name]
        m = {"auroc_harmful": auroc(neg, drifted[harmful]), "auroc_all": auroc(neg, drifted)}
        if name in THRESHOLDS:
            m.update(rates_at(run, name, THRESHOLDS[name]))
        if name.endswith("_score"):
            m["at_levels"] = {str(level): rates_at(run, name, level) for level in LEVELS}
        out[name] = m
    return out


def rates_at(run: dict, name: str, level: float) -> dict:
    """How often score `name` exceeds `level` on each kind of window of one seed."""
    t, harmful = run["tables"], run["harmful"]
    neg, drifted = t["negatives"][name], t["drifted"][name]
    rates = {"tpr_harmful": _share_above(drifted[harmful], level),
             "tpr_all": _share_above(drifted, level), "fpr": _share_above(neg, level)}  # fmt: skip
    if "other" in t:
        other, harmed = t["other"][name], run["other_harmful"]
        rates["fpr_other_recording"] = _share_above(other, level)
        rates["fpr_other_recording_unharmed"] = _share_above(other[~harmed], level)
    return rates


def pooled_metrics(runs: list[dict]) -> dict:
    """AUROCs over the windows of every seed together: each model's own scale matters here."""
    out = {}
    for name in SCORES:
        neg = np.concatenate([r["tables"]["negatives"][name] for r in runs])
        drifted = [r["tables"]["drifted"][name] for r in runs]
        harmful = np.concatenate([d[r["harmful"]] for d, r in zip(drifted, runs, strict=True)])
        out[name] = {"auroc_harmful": auroc(neg, harmful),
                     "auroc_all": auroc(neg, np.concatenate(drifted))}  # fmt: skip
    return out


def spread(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "min": min(values), "max": max(values)}  # fmt: skip


def summarize(per_seed: list[dict]) -> dict:
    """Mean, std, min, max over the seeds of every figure (nested as in seed_metrics)."""

    def over(values: list):
        if isinstance(values[0], dict):
            return {key: over([v[key] for v in values]) for key in values[0]}
        return spread(values)

    return {name: over([m[name] for m in per_seed]) for name in SCORES}


def _share_above(values: np.ndarray, level: float) -> float | None:
    return float((values > level).mean()) if len(values) else None


def format_table(result: dict) -> str:
    def cell(stat, pct=False):
        if stat is None:
            return f"{'–':>13s}"
        if pct:
            return f"{stat['mean'] * 100:5.1f} ±{stat['std'] * 100:4.1f}".rjust(13)
        return f"{stat['mean']:.3f} ±{stat['std']:.3f}".rjust(13)

    columns = ("AUROC harmful", "AUROC all", "pooled h/all", "TPR harm %", "TPR all %", "FPR %",
               "FPR other %")  # fmt: skip
    head = f"{'score':17s} " + " ".join(f"{c:>13s}" for c in columns)
    lines = [head, "-" * len(head)]
    for name in SCORES:
        s, p = result["summary"][name], result["pooled"][name]
        pooled = f"{p['auroc_harmful'] or float('nan'):.3f}/{p['auroc_all']:.3f}"
        lines.append(
            f"{name:17s} {cell(s['auroc_harmful'])} {cell(s['auroc_all'])} {pooled:>13s} "
            f"{cell(s.get('tpr_harmful'), True)} {cell(s.get('tpr_all'), True)} "
            f"{cell(s.get('fpr'), True)} {cell(s.get('fpr_other_recording'), True)}"
        )
    lines.append(
        f"thresholds: calibrated scores 1.0, bn1 {BN1_COORDINATOR_THRESHOLD} (the coordinator's "
        f"default); harmful = base-model accuracy on the window < in-distribution - {MARGIN}"
    )
    return "\n".join(lines)


def main(args) -> int:
    def log(message):
        print(message, file=sys.stderr, flush=True)

    runs, cache = [], {}
    for seed in range(args.seed, args.seed + args.seeds):
        data = load_fan(args.data_dir) if args.dataset == "fan" else load_har(
            args.data_dir, seed, cache)  # fmt: skip
        log(f"seed {seed}: {data.description}")
        run = run_seed(data, seed, args.pretrain_epochs, log)
        log(f"  in-distribution accuracy {run['in_distribution_accuracy']:.3f}, windows "
            f"{run['windows']}, harmful {run['harmful_windows']}")  # fmt: skip
        runs.append(run)
    per_seed = [seed_metrics(run) for run in runs]
    result = {
        "dataset": args.dataset,
        "seeds": args.seeds,
        "window_rows": WINDOW_ROWS,
        "stride_rows": STRIDE_ROWS,
        "margin": MARGIN,
        "pretrain_epochs": args.pretrain_epochs,
        "held_out": f"blocks of 16 rows per stream: 1 in {EVERY} calibration, 1 in {EVERY} "
        "negatives",
        "scores": SCORES,
        "summary": summarize(per_seed),
        "pooled": pooled_metrics(runs),
        "per_seed": [
            {k: v for k, v in run.items() if k not in ("tables", "harmful", "other_harmful")}
            | {"metrics": metrics}
            for run, metrics in zip(runs, per_seed, strict=True)
        ],
    }
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0
