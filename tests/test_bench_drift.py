"""`skipfleet bench drift`: its AUROC, and the JSON it writes (a short fan run)."""

import itertools
import json

import numpy as np
import pytest

from skipfleet.bench_drift import SCORES, auroc
from skipfleet.cli import main


def pairwise_auroc(neg, pos):
    """P(positive > negative) + P(tie) / 2 by counting every pair."""
    pairs = list(itertools.product(neg, pos))
    return sum((p > n) + 0.5 * (p == n) for n, p in pairs) / len(pairs)


def test_auroc_counts_pairs_with_ties_as_half():
    assert auroc([0, 1, 2], [3, 4]) == 1.0
    assert auroc([3, 4], [0, 1, 2]) == 0.0
    assert auroc([1, 1], [1, 1, 1]) == 0.5
    assert auroc([], [1.0]) is None
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 5, 40), rng.integers(1, 6, 30)  # many ties
    assert auroc(neg, pos) == pytest.approx(pairwise_auroc(neg, pos))


def test_bench_drift_writes_the_documented_json(tmp_path, data_dir, capsys):
    out = tmp_path / "drift.json"
    code = main(["bench", "drift", "--data-dir", str(data_dir), "--dataset", "fan", "--seeds", "1",
                 "--pretrain-epochs", "10", "--json", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "fan" and result["window_rows"] == 256 and result["margin"] == 0.05
    assert set(result["summary"]) == set(SCORES) == set(result["pooled"])
    seed = result["per_seed"][0]
    assert seed["windows"]["negatives"] > 0 and seed["windows"]["drifted"] > 0
    assert seed["thresholds"]["confidence"] > 0 and seed["thresholds"]["feature"] > 0
    for name in ("confidence_score", "feature_score", "max_score"):
        metrics = seed["metrics"][name]
        assert {"auroc_harmful", "auroc_all", "tpr_harmful", "fpr", "fpr_other_recording"} <= set(
            metrics
        )
    # the noisy room is far from the quiet one: the calibrated scores find it
    assert seed["metrics"]["confidence_score"]["auroc_all"] > 0.9
    assert "confidence_score" in capsys.readouterr().out
