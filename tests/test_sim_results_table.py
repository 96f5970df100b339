"""The table `simulate` prints at the end: a run still going when the scenario ends is marked."""

from __future__ import annotations

from skipfleet.sim_results import format_table


def a_result(seconds, note: str) -> dict:
    cluster = {"members": ["dev-a", "dev-b"], "rounds": 3, "measured": {}, "candidate": None,
               "note": note}  # fmt: skip
    run = {"run": "r1", "trigger": "label_free_drift", "rounds": 3, "seconds": seconds,
           "clusters": {"c1": cluster}}  # fmt: skip
    return {"per_device": [], "runs": [run], "devices": 2, "new_devices": 0,
            "dataset": "fan", "broker": "mosquitto", "duration_seconds": 50.0}  # fmt: skip


def test_a_run_unfinished_at_the_end_says_so_instead_of_a_blank_outcome():
    table = format_table(a_result(None, ""))
    assert "run r1 (label_free_drift): 3 round(s), still going when the simulation ended" in table
    assert "cluster c1 ['dev-a', 'dev-b']: no outcome yet" in table


def test_a_finished_run_prints_its_clusters_outcome():
    table = format_table(a_result(2.5, "PROMOTED: mean accuracy 1.0000 with v3 vs 0.75"))
    assert "run r1 (label_free_drift): 3 round(s)\n" in table
    assert "cluster c1 ['dev-a', 'dev-b']: PROMOTED: mean accuracy 1.0000 with v3 vs 0.75" in table
