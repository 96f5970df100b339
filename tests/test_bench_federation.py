"""`skipfleet bench federation` on a real (small) fleet: the JSON shape and what it means."""

import json

from skipfleet.cli import main


def test_bench_federation_writes_every_strategy_with_accuracy_and_regressions(
    tmp_path, data_dir, capsys
):
    out = tmp_path / "fed.json"
    code = main([
        "bench", "federation", "--scenario", "mixed-fleet", "--seeds", "1", "--max-rounds", "2",
        "--data-dir", str(data_dir), "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["scenario"], result["dataset"], result["seeds"]) == ("mixed-fleet", "fan", 1)
    strategies = result["strategies"]
    assert set(strategies) == {"base", "own", "today", "one-cohort", "clustered", "pooled"}
    for s in strategies.values():
        assert 0.0 <= s["accuracy_mean"] <= 1.0 and s["accuracy_std"] >= 0.0
        assert isinstance(s["regressions"], int)
    # every device of this fleet has labels and its hold-out judges what it runs: the drifted
    # devices gain, and the fleet keeps them at least near what they had alone
    assert strategies["own"]["accuracy_mean"] > strategies["base"]["accuracy_mean"]
    assert strategies["clustered"]["accuracy_mean"] > strategies["base"]["accuracy_mean"]
    printed = capsys.readouterr().out
    assert "clustered" in printed and "regressions" in printed


def test_bench_federation_refuses_a_dataset_the_scenario_does_not_run_on(data_dir, capsys):
    code = main([
        "bench", "federation", "--scenario", "label-scarce", "--dataset", "har", "--seeds", "1",
        "--data-dir", str(data_dir),
    ])  # fmt: skip
    assert code == 2
    assert "label-scarce runs on damage1, not har" in capsys.readouterr().err
