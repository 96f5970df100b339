"""`skipfleet prepare --from`: a task of the user's own (a CSV or an NPZ table) becomes a base
model pre-trained on some devices and one shard per held-out device, which the agent's loaders
and trainer take as they are; bad tables get errors naming file, row and column."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.data.dataset import holdout_split
from agent.device_data import load_device_data
from agent.trainer.finetune import finetune
from agent.trainer.model import BaseModel
from skipfleet.cli import main
from skipfleet.device_table import read_device_table
from tests.byo_table import CLASSES, FEATURES, PUMPS, ROWS, pump_rows, write_pump_csv

FLEET = ["pump-e", "pump-f"]


def prepare(*argv: str) -> int:
    return main(["prepare", *argv])


@pytest.fixture(scope="module")
def pump_csv(tmp_path_factory) -> Path:
    return write_pump_csv(tmp_path_factory.mktemp("table") / "pumps.csv")


@pytest.fixture(scope="module")
def fleet(pump_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fleet") / "fleet"
    code = prepare("--from", str(pump_csv), "--label-column", "state", "--device-column", "pump",
                   "--holdout-devices", "pump-e,Pump F", "--hidden", "16", "--epochs", "10",
                   "--out", str(out))  # fmt: skip
    assert code == 0
    return out


def test_the_base_model_has_the_tables_shape_and_the_hidden_width_asked_for(fleet):
    model = BaseModel.load(fleet / "base.npz")
    assert (model.n_inputs, model.hidden_width, model.n_classes) == (6, 16, 3)
    assert model.layer_input_dims == (6, 16, 16)
    assert model.calibration is not None and model.calibration.width == 16
    assert model.info["class_names"] == ["clogged", "idle", "running"]  # sorted
    assert model.info["features"] == list(FEATURES)
    with np.load(fleet / "base.npz") as npz:
        assert json.loads(str(npz["header"]))["hidden"] == 16


def test_each_held_out_device_gets_its_rows_in_order_and_the_others_pre_train(fleet):
    manifest = json.loads((fleet / "manifest.json").read_text())
    assert manifest["pretrain_devices"] == ["pump-a", "pump-b", "pump-c", "pump-d"]
    assert [s["simulated_device"] for s in manifest["shards"]] == FLEET
    assert manifest["base_model_hash"] == BaseModel.load(fleet / "base.npz").weights_hash
    for k, device in enumerate(FLEET):
        rows = load_device_data(fleet / "shards" / f"shard-{k}.npz", n_classes=3)
        X, y = pump_rows(PUMPS.index("pump-e" if device == "pump-e" else "Pump F"))
        np.testing.assert_allclose(rows.X, X, atol=1e-4)  # every row, in the file's order
        names = rows.labelled.meta["class_names"]
        assert names == ("clogged", "idle", "running")
        assert [names[k] for k in rows.labelled.y] == [CLASSES[k] for k in y]


def test_the_agents_fine_tune_fixes_the_device_the_base_model_never_saw(fleet):
    """pump-f's sensor is upside down: the agent's own split and Skip2-LoRA fine-tune on its
    shard recover what the base model pre-trained on other pumps gets wrong."""
    model = BaseModel.load(fleet / "base.npz")
    rows = load_device_data(fleet / "shards" / "shard-1.npz", model.n_classes)
    train, holdout = holdout_split(rows.labelled, 0.25, seed=0)
    before = model.accuracy(holdout.X, holdout.y)
    result = finetune(model, train.X, train.y, epochs=30, lr=0.05, seed=0)
    after = model.accuracy(holdout.X, holdout.y, result.adapter)
    assert before < 0.5 and after > 0.9
    assert [a.shape for a, _ in result.adapter.factors] == [(6, 4), (16, 4), (16, 4)]


def test_without_a_list_a_quarter_of_the_devices_is_held_out_at_random(pump_csv, tmp_path):
    out = tmp_path / "fleet"
    assert prepare("--from", str(pump_csv), "--label-column", "state", "--device-column",
                   "pump", "--epochs", "2", "--seed", "3", "--out", str(out)) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    held_out = [s["simulated_device"] for s in manifest["shards"]]
    assert len(held_out) == 2  # ceil(6 / 4)
    assert set(held_out).isdisjoint(manifest["pretrain_devices"])
    assert len(manifest["pretrain_devices"]) == 4


def test_an_npz_table_with_a_block_of_feature_columns(tmp_path):
    X = np.concatenate([pump_rows(k)[0] for k in range(len(PUMPS))])
    y = np.concatenate([pump_rows(k)[1] for k in range(len(PUMPS))])
    device = np.repeat(np.arange(len(PUMPS)), ROWS)  # integer device names
    path = tmp_path / "pumps.npz"
    np.savez(path, X=X, label=y, device=device)
    table = read_device_table(path, "label", "device")
    assert table.feature_names == tuple(f"X[{k}]" for k in range(6))
    assert table.class_names == ("0", "1", "2") and table.devices() == list("012345")
    out = tmp_path / "fleet"
    assert prepare("--from", str(path), "--label-column", "label", "--device-column", "device",
                   "--holdout-count", "1", "--epochs", "2", "--out", str(out)) == 0  # fmt: skip
    assert BaseModel.load(out / "base.npz").hidden_width == 96  # the default width


def test_numeric_labels_sort_as_numbers(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("d,f,label\n" + "".join(f"a,{i},{i % 11}\n" for i in range(22)))
    assert read_device_table(path, "label", "d").class_names[-2:] == ("9", "10")


@pytest.mark.parametrize(
    "text, options, message",
    [
        ("d,f,label\na,1,x\na,2,y\n", {"--label-column": "kind"},
         "no label column 'kind' (columns: d, f, label)"),
        ("d,f,label\na,1,x\nb,oops,y\n", {}, "data row 2, column 'f': 'oops' is not a number"),
        ("d,f,label\na,1,x\nb,,y\n", {}, "data row 2, column 'f': '' is not a number"),
        ("d,f,label\na,1,x\nb,nan,y\n", {}, "non-finite"),
        ("d,f,label\na,1,x\nb,2\n", {}, "data row 2 has 2 cells, the header 3"),
        ("d,f,label\na,1,x\nb,2,x\n", {}, "holds one class ('x')"),
        ("d,f,label\na,1,x\na,2,y\n", {}, "one device only"),
        ("d,f,label\nA b,1,x\na-b,2,y\n", {}, "'A b' and 'a-b' both become device id 'a-b'"),
        ("d,f,label\n!!,1,x\na,2,y\n", {}, "'!!' makes no device id"),
        ("d,f,label\na,1,x\nb,2,y\n", {"--holdout-devices": "zz"}, "no device 'zz'"),
        ("d,f,label\na,1,x\nb,2,y\n", {"--holdout-devices": "a,b"}, "all 2 devices held out"),
        ("d,f,label\na,1,x\nb,2,y\n", {}, "1 rows on the pre-training devices"),
        ("d,f,label\na,1,x\nb,2,y\n", {"--feature-columns": "f,g"}, "no feature column 'g'"),
        ("d,f,label\na,1,x\nb,2,y\n", {"--holdout-count": "2"},
         "--holdout-count must be 1..1 (one device at least pre-trains), got 2"),
        ("d,f,label\na,1,x\nb,1e39,y\n", {}, "data row 2, column 'f': 1e+39 is beyond float32"),
    ],
)  # fmt: skip
def test_bad_tables_are_refused_naming_where(tmp_path, capsys, text, options, message):
    path = tmp_path / "t.csv"
    path.write_text(text)
    given = {"--from": str(path), "--label-column": "label", "--device-column": "d",
             "--out": str(tmp_path / "out"), **options}  # fmt: skip
    assert prepare(*[part for pair in given.items() for part in pair]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out" / "base.npz").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--from", "t.csv", "--label-column", "y"], "--from needs --label-column and "
         "--device-column"),
        (["--from", "t.csv", "--label-column", "y", "--device-column", "d", "--devices", "3"],
         "--devices go(es) with --dataset"),
        (["--dataset", "fan", "--devices", "2", "--label-column", "y"],
         "--label-column go(es) with --from"),
        (["--dataset", "fan", "--devices", "2", "--hidden", "8"], "--hidden go(es) with --from"),
        (["--from", "t.csv", "--label-column", "y", "--device-column", "d", "--hidden", "0"],
         "--hidden and --epochs must be >= 1"),
        (["--from", "t.csv", "--label-column", "y", "--device-column", "d",
          "--holdout-devices", "a", "--holdout-count", "1"], "not both"),
    ],
)  # fmt: skip
def test_options_that_do_not_go_together_are_usage_errors(tmp_path, capsys, argv, message):
    assert prepare(*argv, "--out", str(tmp_path / "out")) == 2
    assert message in capsys.readouterr().err


def test_a_table_in_another_format_is_refused(tmp_path, capsys):
    path = tmp_path / "t.xlsx"
    path.write_text("x")
    assert prepare("--from", str(path), "--label-column", "y", "--device-column", "d",
                   "--out", str(tmp_path / "out")) == 2  # fmt: skip
    assert "expected a .csv or .npz file" in capsys.readouterr().err
