"""The scale summary of `skipfleet bench coordinator`: the figures the scale targets are stated
in, computed from the rounds' records."""

from __future__ import annotations

import math

import pytest

from skipfleet.bench_coordinator_tables import MIB, format_tables, scale_summary, spread


def a_round(latency: float, received: int, sent: int, cpu: float, answered: int) -> dict:
    return {
        "latency_seconds": latency,
        "coordinator_view_seconds": latency + 0.5,
        "phases_seconds": {"finetune": latency / 2, "aggregate_and_store": latency / 4,
                           "canary": latency / 8, "distribute": latency / 8},
        "messages": {"received": {"count": received, "per_second": received / latency,
                                  "by_kind": {}},
                     "sent": {"count": sent, "per_second": sent / latency, "by_kind": {}},
                     "rejected": 0},
        "cpu_seconds": {"coordinator_and_ray": cpu, "mosquitto": 0.1, "load_generators": 1.0,
                        "other": 0.0},
        "aggregation_seconds": {"exact-delta": 0.01},
        "answered": answered,
    }  # fmt: skip


def a_fleet(rounds: list[dict]) -> dict:
    memory = {"driver_rss_bytes": MIB, "driver_pss_bytes": MIB, "tree_rss_bytes": 500 * MIB,
              "tree_pss_bytes": 400 * MIB, "tree_processes": 8}  # fmt: skip
    return {"devices": 100, "processes": 1, "rounds": rounds, "reference": [],
            "memory_idle": memory, "memory_after": memory,
            "memory_peak_pss_bytes": 450 * MIB, "failure": None}  # fmt: skip


def test_spread_is_the_median_the_nearest_rank_p90_and_the_max():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "p90": 3.0, "max": 3.0}
    ten = [float(v) for v in range(1, 11)]
    assert spread(ten) == {"median": 5.5, "p90": 9.0, "max": 10.0}
    assert all(math.isnan(v) for v in spread([]).values())


def test_the_summary_counts_per_device_per_round_and_per_message():
    rounds = [a_round(2.0, 500, 300, 0.8, 100), a_round(4.0, 540, 300, 1.2, 98),
              a_round(3.0, 520, 300, 1.0, 100)]  # fmt: skip
    s = scale_summary(a_fleet(rounds))
    assert s["latency_seconds"] == {"median": 3.0, "p90": 4.0, "max": 4.0}
    assert s["messages_per_device_per_round"] == pytest.approx(8.2)  # median 820 / 100 devices
    assert s["coordinator_cpu_seconds_per_device_per_round"] == pytest.approx(0.01)
    assert s["coordinator_cpu_ms_per_message"] == pytest.approx(1e3 * 1.0 / 820)
    assert s["phase_share"] == pytest.approx(
        {"finetune": 0.5, "aggregate_and_store": 0.25, "canary": 0.125, "distribute": 0.125}
    )
    assert s["reports_missing"] == 2 and s["rejected_messages"] == 0
    assert (s["peak_tree_pss_mib"], s["idle_tree_pss_mib"]) == (450.0, 400.0)
    table = format_tables({"fleets": {"100": a_fleet(rounds)}, "aggregation_micro": {"sizes": {}}})
    assert "    100   1x1     3.00   4.00   4.00    8.20" in table  # 1 partition, 1 node


def test_the_cpu_by_role_table_gives_each_roles_median_per_device_share_and_idle_rate():
    rounds = [a_round(2.0, 500, 300, 0.8, 100), a_round(4.0, 540, 300, 1.2, 100),
              a_round(3.0, 520, 300, 1.0, 100)]  # fmt: skip
    for r, (actor, driver) in zip(rounds, [(0.5, 0.3), (0.9, 0.3), (0.6, 0.4)], strict=True):
        r["cpu_seconds_by_role"] = {"fleet actor": actor, "driver": driver, "raylet": 0.0,
                                    "reaper": 0.0}  # fmt: skip
    idle = {"role fleet actor": 0.018, "role raylet": 0.011, "role reaper": 0.0}
    fleet = a_fleet(rounds) | {"idle_cpu_per_second": idle}
    table = format_tables({"fleets": {"100": fleet}, "aggregation_micro": {"sizes": {}}})
    # medians 0.6 and 0.3 CPU-s of a median whole of 1.0: 6 and 3 ms a device of 100
    assert "    100 fleet actor                 0.60   6.000  60.0%      18.0" in table
    assert "    100 driver                      0.30   3.000  30.0%       nan" in table
    assert table.index("fleet actor") < table.index(" driver ")  # the largest first
    assert "    100 raylet                      0.00   0.000   0.0%      11.0" in table  # idle only
    assert "reaper" not in table  # nothing in a round nor idle: not listed
