"""`skipfleet bench trainer` writes the documented JSON; bad input gets a clear error."""

import json

import pytest

from skipfleet.cli import main

REQUIRED = {
    "accuracy_mean", "accuracy_std", "accuracy_before", "batch_seconds", "finetune_seconds",
    "trainable_params", "cache_bytes", "flops_per_batch",
}  # fmt: skip


def test_bench_trainer_writes_the_documented_json(tmp_path, data_dir, capsys):
    out = tmp_path / "bench.json"
    code = main([
        "bench", "trainer", "--data-dir", str(data_dir), "--dataset", "damage1",
        "--methods", "lora-all,skip2-lora,skip2-lora-q4", "--trials", "2", "--epochs", "3",
        "--pretrain-epochs", "5", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "damage1" and result["trials"] == 2 and result["epochs"] == 3
    assert list(result["methods"]) == ["lora-all", "skip2-lora", "skip2-lora-q4"]
    for name, m in result["methods"].items():
        assert set(m) >= REQUIRED, name
        assert 0.0 <= m["accuracy_mean"] <= 1.0 and 0.0 <= m["accuracy_before"] <= 1.0
        assert set(m["batch_seconds"]) == {"forward", "backward", "update", "total"}
    skip2 = result["methods"]["skip2-lora"]
    assert skip2["cache_bytes"] == 470 * (96 + 96 + 3) * 4  # the paper's 358 KiB
    assert skip2["trainable_params"] == (256 + 96 + 96) * 4 + 3 * 4 * 3
    assert skip2["flops_per_batch"] < result["methods"]["lora-all"]["flops_per_batch"]
    assert "skip2_vs_lora_all_time_cut" in result["comparisons"]
    assert "skip2-lora" in capsys.readouterr().out  # the printed table
    # one base model per trial: the ± covers pre-training noise too
    hashes = result["base_model_hashes"]
    assert len(set(hashes)) == 2 and result["base_model_hash"] == hashes[0]
    assert skip2["accuracy_before_std"] >= 0.0


def test_bench_trainer_har_accepts_drift_subjects(tmp_path, data_dir):
    out = tmp_path / "har.json"
    code = main([
        "bench", "trainer", "--data-dir", str(data_dir), "--dataset", "har",
        "--methods", "skip2-lora", "--trials", "1", "--epochs", "2", "--pretrain-epochs", "2",
        "--drift-subjects", "3", "7", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert "[3, 7]" in result["split"]


def test_bench_reports_missing_data_clearly(tmp_path, capsys):
    code = main(["bench", "trainer", "--data-dir", str(tmp_path / "nope"), "--dataset", "damage1"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_bench_refuses_unknown_methods(data_dir, capsys):
    code = main([
        "bench", "trainer", "--data-dir", str(data_dir), "--dataset", "damage1",
        "--methods", "skip3-lora",
    ])  # fmt: skip
    assert code == 2
    assert "unknown method 'skip3-lora'" in capsys.readouterr().err


def test_bench_refuses_bad_drift_subjects(data_dir, capsys):
    code = main([
        "bench", "trainer", "--data-dir", str(data_dir), "--dataset", "har",
        "--drift-subjects", "31",
    ])  # fmt: skip
    assert code == 2
    assert "31" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["bench"], ["bench", "trainer", "--trials", "0"]])
def test_bench_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_bench_trainer_cnn_writes_the_mlp_keys_plus_memory(tmp_path, data_dir, capsys):
    out = tmp_path / "cnn.json"
    code = main([
        "bench", "trainer", "--data-dir", str(data_dir), "--dataset", "fmnist-rot75",
        "--model", "dwcnn", "--methods", "ft-all,adapter,skip2-lora,skip2-lora-q4",
        "--trials", "2", "--epochs", "1", "--pretrain-epochs", "1", "--pretrain-samples", "300",
        "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["model"] == "dwcnn" and result["trials"] == 2 and result["rank"] == 4
    assert len(set(result["base_model_hashes"])) == 2  # a base model drawn per trial
    for name, m in result["methods"].items():
        assert set(m) >= REQUIRED | {"peak_memory_bytes", "flops_per_batch_trainable"}, name
        assert m["peak_memory_bytes"] > 0 and len(m["accuracy_per_trial"]) == 2
    skip2, q4 = result["methods"]["skip2-lora"], result["methods"]["skip2-lora-q4"]
    assert skip2["cache_bytes"] == 1024 * (784 + 1568 + 1568 + 10) * 4  # x2 pooled, x3, x4, z
    assert skip2["cache_bytes"] > 7 * q4["cache_bytes"]
    assert "adapter_vs_ft_all_trainable_flops_cut" in result["comparisons"]
    assert "peak MB" in capsys.readouterr().out


def test_bench_trainer_cnn_rank_sweep_reports_each_rank(tmp_path, data_dir):
    out = tmp_path / "sweep.json"
    code = main([
        "bench", "trainer", "--data-dir", str(data_dir), "--dataset", "fmnist-unseen",
        "--methods", "lora-last", "--ranks", "1,2", "--trials", "1", "--epochs", "1",
        "--pretrain-epochs", "1", "--pretrain-samples", "300", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["ranks"] == [1, 2]
    one, two = (result["by_rank"][r]["methods"]["lora-last"] for r in ("1", "2"))
    assert two["trainable_params"] == 2 * one["trainable_params"] == 2 * (64 + 10)


def test_bench_delivery_counts_every_report_across_a_short_outage(tmp_path, capsys):
    out = tmp_path / "delivery.json"
    code = main([
        "bench", "delivery", "--outage-seconds", "2", "--cut", "refuse", "--rate", "10",
        "--before-seconds", "0.5", "--after-seconds", "0.5", "--json", str(out),
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0, result
    assert result["reports_sent"] == result["delivered"] > result["reports_made_during_outage"] > 0
    assert result["lost"] == result["applied_twice"] == 0
    assert result["handed_to_paho"] == result["reports_sent"]  # each row once
    assert "applied twice" in capsys.readouterr().out
