"""The printed tables of `skipfleet bench coordinator` (the JSON holds every figure)."""

from __future__ import annotations

import math
import statistics

from skipfleet.bench_aggregation import format_table as aggregation_table
from skipfleet.measure import COORDINATOR

MIB = 2**20


def format_tables(result: dict) -> str:
    fleets = list(result["fleets"].values())
    parts = [
        "Scale: round latency over the rounds; messages (in + out) and coordinator CPU "
        "(its whole tree, Ray included) per device per round; the load generator's CPU (gen: "
        "the simulated devices, on the same cores) per device per round; phases as shares of "
        "the median round; peak and idle PSS of the coordinator's tree; its start-up (process "
        "to healthy)",
        _scale(fleets),
        "",
        "Round latency: POST /finetune -> the promoted adapter running on every device "
        "(device-side timestamps); phases from the coordinator's records",
        _latency(fleets),
        "",
        "Coordinator messages over the round (Prometheus counters / round seconds); CPU "
        "seconds used during the round (gen: the load generator's processes, competing with the "
        "coordinator for the cores; other: the rest of this shared machine, kernel included)",
        _messages(fleets),
        "",
        "Aggregation inside the coordinator (time per round, in the fleet actor or its Ray "
        "task: --aggregate-in; from skipfleet_aggregation_duration_seconds)",
        _aggregation(fleets),
        "",
        "Coordinator CPU by process role over the round (median over the rounds: CPU seconds, "
        "ms a device, share of the tree's), and with every device online and no round (ms a "
        "second)",
        _cpu_by_role(fleets),
        "",
        "Coordinator memory: the driver process, and its whole tree (driver + Ray) in RSS and PSS",
        _memory(fleets),
        "",
        "Coordinator PSS by process role (MiB, processes in brackets): idle before the rounds; "
        "in the sample of the tree's peak; each role's own peak",
        _memory_by_role(fleets),
        "",
        "Aggregation strategies alone, synthetic HAR-shaped reports (185/96/96 inputs, 6 "
        "classes, rank 4), median time",
        aggregation_table(result["aggregation_micro"]),
    ]
    failures = [f"{f['devices']} devices: {f['failure']}" for f in fleets if f["failure"]]
    if failures:
        parts += ["", "FAILED: " + "; ".join(failures)]
    return "\n".join(parts)


def spread(values: list[float]) -> dict[str, float]:
    """median, p90 (nearest rank) and max; NaN for none."""
    if not values:
        return {"median": float("nan"), "p90": float("nan"), "max": float("nan")}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, max(0, math.ceil(0.9 * len(ordered)) - 1))]
    return {"median": statistics.median(ordered), "p90": p90, "max": ordered[-1]}


def scale_summary(fleet: dict) -> dict:
    """The figures the scale targets are stated in, from one fleet size's rounds."""
    rounds, devices = fleet["rounds"], fleet["devices"]
    messages = [r["messages"]["received"]["count"] + r["messages"]["sent"]["count"]
                for r in rounds]  # fmt: skip
    cpu = [r["cpu_seconds"][COORDINATOR] for r in rounds]
    generators = [r["cpu_seconds"].get("load_generators", math.nan) for r in rounds]
    cpu_per_message = [c / m for c, m in zip(cpu, messages, strict=True) if m]
    phases = {phase: _median(rounds, lambda r, p=phase: r["phases_seconds"][p])
              for phase, _ in PHASES}  # fmt: skip
    whole = sum(phases.values())
    return {
        "latency_seconds": spread([r["latency_seconds"] for r in rounds]),
        "messages_per_device_per_round": _safe(statistics.median, messages) / devices,
        "coordinator_cpu_seconds_per_device_per_round": _safe(statistics.median, cpu) / devices,
        "coordinator_cpu_ms_per_message": 1e3 * _safe(statistics.median, cpu_per_message),
        # the simulated devices' CPU, on the same cores: what the latency is measured beside
        "loadgen_cpu_seconds_per_device_per_round": _safe(statistics.median, generators) / devices,
        "phase_share": {p: (v / whole if whole > 0 else float("nan")) for p, v in phases.items()},
        "peak_tree_pss_mib": fleet["memory_peak_pss_bytes"] / MIB,
        "idle_tree_pss_mib": fleet["memory_idle"]["tree_pss_bytes"] / MIB,
        "startup_seconds": fleet.get("coordinator_startup_seconds", float("nan")),
        # every device's report in every round, and no message the coordinator refused
        "reports_missing": sum(devices - r["answered"] for r in rounds),
        "rejected_messages": sum(r["messages"]["rejected"] for r in rounds),
    }  # fmt: skip


def _safe(reduce, values: list[float]) -> float:
    return reduce(values) if values else float("nan")


SHARE_WIDTHS = (("finetune", 4), ("aggregate_and_store", 4), ("canary", 5), ("distribute", 4))


def _scale(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'parts':>5s} {'median s':>8s} {'p90 s':>6s} {'max s':>6s} "
             f"{'msg/dev':>7s} "
             f"{'cpu ms/dev':>10s} {'cpu ms/msg':>10s} {'gen ms/dev':>10s} {'tune':>5s} "
             f"{'aggr':>5s} {'canary':>6s} {'distr':>5s} {'peak PSS MiB':>12s} "
             f"{'idle PSS MiB':>12s} "
             f"{'start s':>7s}"]  # fmt: skip
    for f in fleets:
        s = scale_summary(f)
        lat, share = s["latency_seconds"], s["phase_share"]
        shares = " ".join(f"{100 * share[p]:{w}.0f}%" for p, w in SHARE_WIDTHS)
        lines.append(
            f"{f['devices']:7d} {_layout(f):>5s} {lat['median']:8.2f} {lat['p90']:6.2f} "
            f"{lat['max']:6.2f} "
            f"{s['messages_per_device_per_round']:7.2f} "
            f"{1e3 * s['coordinator_cpu_seconds_per_device_per_round']:10.2f} "
            f"{s['coordinator_cpu_ms_per_message']:10.3f} "
            f"{1e3 * s['loadgen_cpu_seconds_per_device_per_round']:10.2f} {shares} "
            f"{s['peak_tree_pss_mib']:12.1f} {s['idle_tree_pss_mib']:12.1f} "
            f"{s['startup_seconds']:7.1f}"
        )
    return "\n".join(lines)


def _layout(fleet: dict) -> str:
    """Partitions x Ray nodes (the bench's own nodes; 1: the coordinator's own Ray)."""
    return f"{fleet.get('partitions', 1)}x{fleet.get('ray_nodes', 1)}"


def _median(rounds: list[dict], pick) -> float:
    values = [pick(r) for r in rounds]
    return statistics.median(values) if values else float("nan")


PHASES = (("finetune", 7), ("aggregate_and_store", 7), ("canary", 8), ("distribute", 7))


def _latency(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'procs':>5s} {'rounds':>6s} {'latency s':>9s} {'max s':>7s} "
             f"{'api s':>7s} {'tune s':>7s} {'aggr s':>7s} {'canary s':>8s} {'distr s':>7s} "
             f"{'dev s':>6s}"]  # fmt: skip
    for f in fleets:
        rounds = f["rounds"]
        device_s = f["reference"][0]["device_seconds"] if f["reference"] else float("nan")
        latest = max((r["latency_seconds"] for r in rounds), default=float("nan"))
        phases = [
            f"{_median(rounds, lambda r, p=phase: r['phases_seconds'][p]):{width}.2f}"
            for phase, width in PHASES
        ]
        lines.append(
            f"{f['devices']:7d} {f['processes']:5d} {len(rounds):6d} "
            f"{_median(rounds, lambda r: r['latency_seconds']):9.2f} {latest:7.2f} "
            f"{_median(rounds, lambda r: r['coordinator_view_seconds']):7.2f} "
            f"{' '.join(phases)} {device_s:6.3f}"
        )
    return "\n".join(lines)


def _messages(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'recv':>7s} {'recv/s':>8s} {'sent':>7s} {'sent/s':>8s} "
             f"{'rejected':>8s} {'cpu coord':>9s} {'cpu mqtt':>8s} {'cpu gen':>7s} "
             f"{'cpu other':>9s}"]  # fmt: skip
    for f in fleets:
        rounds = f["rounds"]
        if not rounds:
            continue

        def m(direction, key, rounds=rounds):
            return _median(rounds, lambda r: r["messages"][direction][key])

        def cpu(party, rounds=rounds):
            return _median(rounds, lambda r: r["cpu_seconds"][party])

        lines.append(
            f"{f['devices']:7d} {m('received', 'count'):7.0f} {m('received', 'per_second'):8.1f} "
            f"{m('sent', 'count'):7.0f} {m('sent', 'per_second'):8.1f} "
            f"{_median(rounds, lambda r: r['messages']['rejected']):8.0f} "
            f"{cpu(COORDINATOR):9.1f} {cpu('mosquitto'):8.1f} "
            f"{cpu('load_generators'):7.1f} {cpu('other'):9.1f}"
        )
    return "\n".join(lines)


def _cpu_by_role(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'role':<24s} {'cpu s':>7s} {'ms/dev':>7s} {'share':>6s} "
             f"{'idle ms/s':>9s}"]  # fmt: skip
    for f in fleets:
        rounds = [r for r in f["rounds"] if r.get("cpu_seconds_by_role")]
        if not rounds:
            continue
        roles = set().union(*(r["cpu_seconds_by_role"] for r in rounds))
        medians = {role: _median(rounds, lambda r, x=role: r["cpu_seconds_by_role"].get(x, 0.0))
                   for role in roles}  # fmt: skip
        whole = _median(rounds, lambda r: sum(r["cpu_seconds_by_role"].values()))
        idle = f.get("idle_cpu_per_second", {})
        for role, seconds in sorted(medians.items(), key=lambda item: -item[1]):
            if seconds == 0 and not idle.get(f"role {role}"):
                continue  # no process of this role, or one that used nothing
            share = 100 * seconds / whole if whole > 0 else float("nan")
            idle_ms = 1e3 * idle.get(f"role {role}", float("nan"))
            lines.append(f"{f['devices']:7d} {role:<24s} {seconds:7.2f} "
                         f"{1e3 * seconds / f['devices']:7.3f} {share:5.1f}% "
                         f"{idle_ms:9.1f}")  # fmt: skip
    return "\n".join(lines)


def _aggregation(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'exact-delta ms':>14s} {'naive-fedavg ms':>15s}"]
    for f in fleets:
        rounds = f["rounds"]
        if rounds:
            exact = _median(rounds, lambda r: r["aggregation_seconds"].get("exact-delta", 0.0))
            naive = _median(rounds, lambda r: r["aggregation_seconds"].get("naive-fedavg", 0.0))
            lines.append(f"{f['devices']:7d} {1e3 * exact:14.2f} {1e3 * naive:15.2f}")
    return "\n".join(lines)


def _memory(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'driver RSS':>10s} {'tree RSS':>9s} {'tree PSS':>9s} "
             f"{'procs':>5s} {'peak PSS':>9s} {'after PSS':>9s}  (MiB)"]  # fmt: skip
    for f in fleets:
        idle, after = f["memory_idle"], f["memory_after"]
        lines.append(
            f"{f['devices']:7d} {idle['driver_rss_bytes'] / MIB:10.1f} "
            f"{idle['tree_rss_bytes'] / MIB:9.1f} {idle['tree_pss_bytes'] / MIB:9.1f} "
            f"{idle['tree_processes']:5d} {f['memory_peak_pss_bytes'] / MIB:9.1f} "
            f"{after['tree_pss_bytes'] / MIB:9.1f}"
        )
    return "\n".join(lines)


def _memory_by_role(fleets: list[dict]) -> str:
    lines = [f"{'devices':>7s} {'role':<24s} {'idle':>11s} {'at peak':>11s} {'own peak':>11s}"]
    for f in fleets:
        columns = [f.get(k, {}) for k in
                   ("memory_idle_by_role", "memory_peak_by_role", "memory_role_peaks")]  # fmt: skip
        roles = sorted(
            set().union(*columns), key=lambda r: -columns[2].get(r, {}).get("pss_bytes", 0)
        )
        for role in roles:
            cells = [_pss_cell(column.get(role)) for column in columns]
            lines.append(f"{f['devices']:7d} {role:<24s} " + " ".join(f"{c:>11s}" for c in cells))
    return "\n".join(lines)


def _pss_cell(memory: dict | None) -> str:
    if not memory:
        return "-"
    return f"{memory['pss_bytes'] / MIB:.0f} ({memory['processes']})"
