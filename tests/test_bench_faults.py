"""`skipfleet bench faults --skip-live`: the trust scenarios on the coordinator's fleet state,
with devices that train on real data, and the JSON and table they leave."""

import json

from skipfleet.cli import main


def test_bench_faults_trust_scenarios_hold_and_write_their_rows(tmp_path, data_dir, capsys):
    out = tmp_path / "faults.json"
    code = main([
        "bench", "faults", "--data-dir", str(data_dir), "--skip-live", "--rounds", "2",
        "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--json", str(out),
    ])  # fmt: skip
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["rows"]}
    median = rows["poisoning device, 2 rounds"]  # the coordinator's default: coordinate-median
    assert median["honest_harmed"] == 0 and median["reports_lost"] == 0 and median["held"]
    assert rows["poisoning device, 2 rounds (exact-delta)"]["comparison"]
    summary = median["detail"]["summary"]
    assert summary["wedged_rounds"] == 0
    # the liar neither harmed nor held back the others: they learned as without it
    assert summary["end_accuracy_with_liar"] > summary["base_accuracy"] + 0.2
    overflow = rows["1e30 report"]
    assert overflow["held"] and overflow["detail"]["stage"] == "STORED"
    assert "refused" in overflow["detail"]["failures"]["big"]
    assert overflow["detail"]["next_round_started"]  # the cohort was free again
    silent = rows["silent device"]
    assert silent["held"] and silent["recover_s"] == 0.0  # closed at its deadline, not later
    assert "no answer by the deadline" in silent["detail"]["failures"]["mute"]
    printed = capsys.readouterr().out
    assert "| silent device |" in printed and "| 1e30 report |" in printed
    assert code == (0 if all(r["held"] or r["comparison"] for r in rows.values()) else 3)
