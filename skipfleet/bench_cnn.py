"""`skipfleet bench trainer --dataset fmnist-rot75|fmnist-unseen --model cnn|dwcnn`: the CNN
methods compared on this machine (the Skip2-LoRA CNN follow-up and the PEFT study).

Every trial draws its own fine-tune images and pre-trains its own base model (both from the
trial's seed), then fine-tunes that base with every method at every rank, the methods
interleaved so machine noise falls on all alike. Memory is measured in a separate, untimed run
per method (tracemalloc peak and the process's peak RSS, reset before the run), so tracing
costs no time in the timed runs. The JSON per method has the MLP bench's keys plus
`peak_memory_bytes` and the rest listed in `summarize`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.fmnist_tasks import load_fmnist_task
from agent.trainer.cnn import arch
from agent.trainer.cnn.finetune import pretrain_cnn, run_cnn_method
from agent.trainer.cnn.flops import method_flops
from agent.trainer.cnn.methods import cnn_method_names, resolve_cnn
from agent.trainer.cnn.model import CnnModel, init_cnn, widen_classes
from agent.trainer.finetune import evaluate
from skipfleet.bench_trainer import comparisons, machine_info
from skipfleet.processes import rss_bytes

DATASETS = ("fmnist-rot75", "fmnist-unseen")
MODELS = ("cnn", "dwcnn")
DEFAULTS = {"epochs": 10, "lr": 0.02, "trials": 5, "pretrain_epochs": 2, "ranks": (4,)}
BATCH = 20
PRETRAIN_LR = 0.05


@dataclass
class Run:
    accuracy: float
    result: object  # FinetuneResult


def parse_methods(text: str) -> list[str]:
    if text == "all":
        return cnn_method_names()
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        resolve_cnn(name)  # raises with the list of valid names
    return names


def parse_ranks(text: str | None) -> tuple[int, ...]:
    if not text:
        return DEFAULTS["ranks"]
    ranks = tuple(int(r) for r in text.split(","))
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--ranks must be positive integers, got {text!r}")
    return ranks


# ------------------------------------------------------------------------ one trial
def pretrained_base(task, model_name, *, seed, epochs, tap_pool, log) -> CnnModel:
    t0 = time.perf_counter()
    X, y = task.pretrain.X, task.pretrain.y
    model = pretrain_cnn(X, y, task.n_pretrain_classes, architecture=model_name, epochs=epochs,
                         lr=PRETRAIN_LR, seed=seed, info={"task": task.name},
                         units=arch.build(model_name, task.n_pretrain_classes,
                                          tap_pool=tap_pool))  # fmt: skip
    if task.n_pretrain_classes < task.finetune.n_classes:  # the device adds its new classes
        model = widen_classes(model, task.finetune.n_classes, np.random.default_rng(seed))
    log(f"  pre-trained {model_name} ({model.n_parameters} parameters) on {len(y)} images "
        f"in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return model


def run_trial(task, base, methods, ranks, *, epochs, lr, seed):
    """{rank: {method: Run}}; the Skip methods are scored on one pass of test features."""
    xs, z = base.frozen_features(task.test.X)  # the Skip adapters' inputs on the test set
    runs: dict[int, dict[str, Run]] = {}
    for rank in ranks:
        runs[rank] = {}
        for name in methods:
            result = run_cnn_method(base, task.finetune.X, task.finetune.y, method=name,
                                    epochs=epochs, lr=lr, batch_size=BATCH, rank=rank,
                                    seed=seed)  # fmt: skip
            if result.adapter is not None:
                logits = z + result.adapter.delta_logits(xs)
                accuracy = float((logits.argmax(axis=1) == task.test.y).mean())
            else:
                accuracy = evaluate(result.trainer, base, task.test.X, task.test.y)
            runs[rank][name] = Run(accuracy, result)
    before = float((z.argmax(axis=1) == task.test.y).mean())
    return runs, before


# --------------------------------------------------------------------------- memory
def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_memory(fn) -> dict:
    """Peak memory of fn(): traced Python/NumPy allocations and the process's peak RSS."""
    rss_before, _ = rss_bytes(os.getpid())
    can_reset = _reset_peak_rss()
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    _, rss_peak = rss_bytes(os.getpid())
    return {
        "peak_memory_bytes": int(peak),  # what the fine-tune allocated at its peak
        "rss_peak_bytes": int(rss_peak) if can_reset else None,  # the whole process's peak
        "rss_increase_bytes": int(rss_peak - rss_before) if can_reset else None,
    }


def memory_pass(task, base, methods, ranks, *, epochs, lr, seed) -> dict:
    out = {}
    for rank in ranks:
        for name in methods:
            out[(rank, name)] = measure_memory(
                lambda name=name, rank=rank: run_cnn_method(
                    base, task.finetune.X, task.finetune.y, method=name, epochs=epochs, lr=lr,
                    batch_size=BATCH, rank=rank, seed=seed)
            )  # fmt: skip
    return out


# ------------------------------------------------------------------- fixed cost per batch
def fixed_cost_per_batch(methods, model_name, *, n_samples, n_classes, rank, repeats=3):
    """Seconds per batch of each method on an 8×8-pixel, 2-channel version of the model."""
    rng = np.random.default_rng(0)
    side = 8
    units = arch.build(model_name, n_classes, side, **TINY_WIDTHS[model_name])
    model = init_cnn(units, rng, side)
    X = rng.standard_normal((n_samples, side * side)).astype(np.float32)
    y = rng.integers(0, n_classes, n_samples)
    out = {}
    for name in methods:
        runs = [run_cnn_method(model, X, y, method=name, epochs=3, lr=0.01, rank=rank, seed=0)
                for _ in range(repeats)]  # fmt: skip
        out[name] = min(r.times.per_batch()["total"] for r in runs)
    return out


TINY_WIDTHS = {"cnn": {"width": 2, "hidden": 4}, "dwcnn": {"width": 2}}


# ----------------------------------------------------------------------------- summary
def summarize(units, side, trials, memory, *, rank, epochs, call_floor_s, fixed) -> dict:
    """Per method: the MLP bench's keys, plus memory, the FLOPs split and per-trial figures."""
    out = {}
    for name in trials[0][0][rank]:
        runs = [trial_runs[rank][name] for trial_runs, _ in trials]
        accuracies = [r.accuracy for r in runs]
        results = [r.result for r in runs]
        per_batch = [r.times.per_batch() for r in results]
        trainable = results[0].trainer.trainable_params
        flops = method_flops(units, side, resolve_cnn(name), batch=BATCH, rank=rank,
                             epochs=epochs, trainable_params=trainable)  # fmt: skip
        total = statistics.fmean(p["total"] for p in per_batch)
        out[name] = {
            "accuracy_mean": statistics.fmean(accuracies),
            "accuracy_std": statistics.pstdev(accuracies),
            "accuracy_before": statistics.fmean(before for _, before in trials),
            "accuracy_per_trial": accuracies,
            "batch_seconds": {
                phase: statistics.fmean(p[phase] for p in per_batch) for phase in per_batch[0]
            },
            "batch_seconds_min_total": min(p["total"] for p in per_batch),
            "batch_seconds_total_per_trial": [p["total"] for p in per_batch],
            "finetune_seconds": statistics.fmean(r.seconds for r in results),
            "finetune_seconds_per_trial": [r.seconds for r in results],
            "trainable_params": int(trainable),
            "cache_bytes": int(results[0].cache_bytes),
            "cache_hit_rate": results[0].cache_hit_rate,
            "flops_per_batch": flops.total,
            "flops_per_batch_forward": int(flops.forward),
            "flops_per_batch_backward": int(flops.backward),
            "flops_per_batch_trainable": int(flops.trainable),
            "gflops_achieved": flops.total / total / 1e9,
            "batch_time_in_call_floors": total / call_floor_s,
            "batch_seconds_fixed_cost": fixed[name],
            "fixed_cost_share": fixed[name] / total,
            **memory[(rank, name)],
        }
    return out


def cnn_comparisons(methods: dict) -> dict:
    """The MLP bench's ratios, plus the CNN issue's: fine-tune time, cache, FLOPs, memory."""
    out = comparisons(methods)

    def ratio(a, b, key):
        if a in methods and b in methods and methods[b][key]:
            return methods[a][key] / methods[b][key]
        return None

    pairs = {
        "skip2_vs_lora_all_finetune_time_cut": ("skip2-lora", "lora-all", "finetune_seconds"),
        "adapter_vs_ft_all_trainable_flops_cut": (
            "adapter", "ft-all", "flops_per_batch_trainable"),
        "lora_all_vs_ft_all_trainable_flops_cut": (
            "lora-all", "ft-all", "flops_per_batch_trainable"),
    }  # fmt: skip
    for key, (a, b, field) in pairs.items():
        value = ratio(a, b, field)
        if value is not None:
            out[key] = 1.0 - value
    for name in ("lora-all", "dora", "galore", "adapter", "skip2-lora"):
        value = ratio(name, "ft-all", "peak_memory_bytes")
        if value is not None:
            out[f"{name.replace('-', '_')}_vs_ft_all_peak_memory"] = value
    for name in ("galore", "lora-all-adam"):  # against full fine-tuning with the same optimizer
        value = ratio(name, "ft-all-adam", "peak_memory_bytes")
        if value is not None:
            out[f"{name.replace('-', '_')}_vs_ft_all_adam_peak_memory"] = value
    if "skip2-lora" in methods and "skip2-lora-q4" in methods:
        gap = methods["skip2-lora-q4"]["accuracy_mean"] - methods["skip2-lora"]["accuracy_mean"]
        out["q4_minus_dense_accuracy"] = gap
    return out


# ------------------------------------------------------------------------------- output
def format_table(result: dict) -> str:
    head = (
        f"{'method':14s} {'acc %':>6s} {'±':>5s} {'fwd ms':>7s} {'bwd ms':>7s} {'batch ms':>8s} "
        f"{'tune s':>7s} {'params':>7s} {'cache B':>10s} {'peak MB':>8s} {'MFLOP/b':>8s} "
        f"{'train MF':>8s}"
    )
    lines = [head, "-" * len(head)]
    for name, m in result["methods"].items():
        b = m["batch_seconds"]
        lines.append(
            f"{name:14s} {m['accuracy_mean'] * 100:6.2f} {m['accuracy_std'] * 100:5.2f} "
            f"{b['forward'] * 1e3:7.2f} {b['backward'] * 1e3:7.2f} {b['total'] * 1e3:8.2f} "
            f"{m['finetune_seconds']:7.2f} {m['trainable_params']:7d} {m['cache_bytes']:10d} "
            f"{m['peak_memory_bytes'] / 1e6:8.2f} {m['flops_per_batch'] / 1e6:8.2f} "
            f"{m['flops_per_batch_trainable'] / 1e6:8.3f}"
        )
    first = next(iter(result["methods"].values()))
    lines.append(f"accuracy before fine-tuning: {first['accuracy_before'] * 100:.2f} %")
    for key, value in result["comparisons"].items():
        shown = f"{value * 100:.1f} %" if "cut" in key or "accuracy" in key else f"{value:.2f}x"
        lines.append(f"{key}: {shown}")
    return "\n".join(lines)


def main(args) -> int:
    methods = parse_methods(args.methods)
    ranks = parse_ranks(args.ranks)
    epochs = args.epochs or DEFAULTS["epochs"]
    lr = args.lr or DEFAULTS["lr"]
    trials_n = args.trials or DEFAULTS["trials"]
    pretrain_epochs = args.pretrain_epochs or DEFAULTS["pretrain_epochs"]

    def log(message):
        print(message, file=sys.stderr, flush=True)

    log(f"{args.dataset}, {args.model}: {len(methods)} methods x ranks {list(ranks)} x "
        f"{trials_n} trials, {epochs} epochs, lr {lr}")  # fmt: skip
    trials, hashes = [], []
    memory = None
    for trial in range(trials_n):
        t0 = time.perf_counter()
        seed = args.seed + trial
        task = load_fmnist_task(args.data_dir, args.dataset, seed=seed,
                                n_pretrain=args.pretrain_samples)  # fmt: skip
        if trial == 0:
            log(f"split: {task.description} (seed = --seed + trial)")
        base = pretrained_base(task, args.model, seed=seed, epochs=pretrain_epochs,
                               tap_pool=args.tap_pool, log=log)  # fmt: skip
        hashes.append(base.weights_hash)
        trials.append(run_trial(task, base, methods, ranks, epochs=epochs, lr=lr, seed=seed))
        if memory is None:  # one untimed run per method: memory does not vary by trial
            memory = memory_pass(task, base, methods, ranks, epochs=epochs, lr=lr, seed=seed)
        log(f"trial {trial + 1}/{trials_n} done in {time.perf_counter() - t0:.0f} s")
    units, side = base.units, base.side
    log("fixed cost per batch: the same methods on an 8x8, 2-channel model...")
    machine = machine_info()
    by_rank = {}
    for rank in ranks:
        fixed = fixed_cost_per_batch(methods, args.model, n_samples=len(task.finetune),
                                     n_classes=base.n_classes, rank=rank)  # fmt: skip
        floor = machine["numpy_ufunc_call_seconds"]
        summary = summarize(units, side, trials, memory, rank=rank, epochs=epochs,
                            call_floor_s=floor, fixed=fixed)  # fmt: skip
        by_rank[rank] = {
            "dataset": args.dataset, "model": args.model, "trials": trials_n, "epochs": epochs,
            "lr": lr, "batch_size": BATCH, "rank": rank, "split": task.description,
            "base_model_hash": hashes[0], "base_model_hashes": hashes,
            "model_parameters": base.n_parameters, "layer_input_dims": list(base.layer_input_dims),
            "pretrain_epochs": pretrain_epochs, "tap_pool": args.tap_pool,
            "methods": summary, "comparisons": cnn_comparisons(summary), "machine": machine,
        }  # fmt: skip
        print(f"rank {rank}:\n{format_table(by_rank[rank])}")
    result = by_rank[ranks[0]] if len(ranks) == 1 else {
        "dataset": args.dataset, "model": args.model, "ranks": list(ranks),
        "by_rank": {str(r): v for r, v in by_rank.items()},
    }  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0
