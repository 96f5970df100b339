"""`skipfleet bench federation`: does the fleet make devices better than they are alone?

For each seed a scenario's fleet is built (its own pre-trained base model), every strategy of
skipfleet.federation_sim runs on it, and each scored device is measured on rows no device ever
saw. Per strategy: mean and spread over seeds of the scored devices' mean accuracy, and
`regressions`: scored devices that end below max(before, own), i.e. below what the base model
or the device's own fine-tune gave it (summed over seeds).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from skipfleet.federation_scenarios import SCENARIOS
from skipfleet.federation_sim import STRATEGIES, Federation, Settings, scored_accuracy


def run_seed(scenario: str, data_dir: Path, seed: int, settings: Settings) -> dict:
    _, build = SCENARIOS[scenario]
    fleet = build(data_dir, seed)
    if settings.lr is not None:
        fleet = dataclasses.replace(fleet, lr=settings.lr)
    federation = Federation(fleet, settings, seed)
    scored = [d for d in fleet.devices if d.scored]
    out = {}
    for strategy in STRATEGIES:
        outcome = federation.run(strategy)
        accuracies = {
            d.device_id: scored_accuracy(fleet, d, outcome.running[d.device_id]) for d in scored
        }
        out[strategy] = {
            "accuracies": accuracies,
            "clusters": {c: list(m) for c, m in outcome.clusters.items()},
            "rounds": outcome.rounds,
            "promoted": outcome.promoted,
        }
    floor = {
        d: max(out["base"]["accuracies"][d], out["own"]["accuracies"][d])
        for d in out["base"]["accuracies"]
    }
    for result in out.values():
        result["regressed"] = sorted(d for d, a in result["accuracies"].items() if a < floor[d])
    return out


def summarize(per_seed: list[dict]) -> dict:
    out = {}
    for strategy in STRATEGIES:
        means = [statistics.fmean(s[strategy]["accuracies"].values()) for s in per_seed]
        out[strategy] = {
            "accuracy_mean": statistics.fmean(means),
            "accuracy_std": statistics.pstdev(means),
            "accuracy_per_seed": means,
            "regressions": sum(len(s[strategy]["regressed"]) for s in per_seed),
            "regressed_devices": [s[strategy]["regressed"] for s in per_seed],
        }
    return out


def run(scenario: str, data_dir: Path, seeds: int, settings: Settings, log=print) -> dict:
    dataset, _ = SCENARIOS[scenario]
    per_seed = []
    for seed in range(seeds):
        started = time.perf_counter()
        per_seed.append(run_seed(scenario, data_dir, seed, settings))
        log(f"seed {seed + 1}/{seeds} done in {time.perf_counter() - started:.1f} s")
    p = settings.policy
    return {
        "scenario": scenario,
        "dataset": dataset,
        "seeds": seeds,
        "settings": {
            "method": settings.method,
            "steps_per_round": p.steps,
            "max_rounds": p.max_rounds,
            "min_gain": p.min_gain,
            "cluster_distance": settings.cluster_distance,
            "min_canaries": settings.rollout.min_canaries,
            "lr": settings.lr,
            "algorithm": settings.algorithm,
            "own_epochs": settings.own_epochs,
        },
        "strategies": summarize(per_seed),
        "per_seed": per_seed,
    }


def print_table(result: dict, out=sys.stdout) -> None:
    print(f"{result['scenario']} ({result['dataset']}), {result['seeds']} seeds", file=out)
    print(f"{'strategy':<12} {'accuracy %':>10} {'± std':>7} {'regressions':>12}", file=out)
    for name, s in result["strategies"].items():
        mean, std = 100 * s["accuracy_mean"], 100 * s["accuracy_std"]
        print(f"{name:<12} {mean:>10.2f} {std:>7.2f} {s['regressions']:>12}", file=out)
    last = result["per_seed"][-1]["clustered"]
    print(f"clusters (last seed): {last['clusters']}", file=out)
    print(f"rounds per cluster (last seed): {last['rounds']}", file=out)


def main(args, data_dir: Path) -> int:
    from coordinator.federation import FederationPolicy

    settings = Settings(
        method=args.method,
        policy=FederationPolicy(
            max_rounds=args.max_rounds, steps=args.steps, min_gain=args.min_gain
        ),
        cluster_distance=args.cluster_distance,
        lr=args.lr,
        algorithm=args.algorithm,
    )
    result = run(args.scenario, data_dir, args.seeds, settings)
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
