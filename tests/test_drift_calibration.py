"""The drift calibration: computed at pre-training time, shipped in the base model file, and
what it makes of real in-distribution and drifted windows."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from agent.data import load_fan_fleet_group
from agent.data.fan import load_fan_task
from agent.drift import WINDOW_ROWS, score_window
from agent.drift_calibration import cyclic_windows, fit_calibration
from agent.trainer.errors import ModelFileError
from agent.trainer.finetune import pretrain
from agent.trainer.model import BaseModel
from skipfleet.base_model import BLOCK_ROWS, held_out_blocks, pretrain_calibrated, streams_of


@pytest.fixture(scope="module")
def fan(data_dir):
    task = load_fan_task(data_dir, "damage1")
    model = pretrain(task.pretrain.X, task.pretrain.y, 3, epochs=5, seed=0)
    return task, model


@pytest.fixture(scope="module")
def calibrated(fan):
    task, model = fan
    recordings = streams_of(np.arange(len(task.test)), task.test.meta["recording"])
    return model.with_calibration(
        fit_calibration(model, task.pretrain.X, [task.test.X[r] for r in recordings])
    )


def test_calibration_round_trips_through_the_model_file_outside_the_hash(tmp_path, fan,
                                                                        calibrated):  # fmt: skip
    _, bare = fan
    assert calibrated.weights_hash == bare.weights_hash  # adapters depend on weights alone
    calibrated.save(tmp_path / "m.npz")
    loaded = BaseModel.load(tmp_path / "m.npz")
    c, original = loaded.calibration, calibrated.calibration
    for name in ("mean", "std", "precision"):
        np.testing.assert_array_equal(getattr(c, name), getattr(original, name))
    assert c.header() == original.header() and c.width == loaded.hidden_width == 96
    assert loaded.weights_hash == bare.weights_hash


def test_a_model_file_without_calibration_loads_without_one(tmp_path, fan):
    _, bare = fan
    bare.save(tmp_path / "old.npz")
    with np.load(tmp_path / "old.npz") as npz:
        assert not any(name.startswith("calibration") for name in npz.files)
    assert BaseModel.load(tmp_path / "old.npz").calibration is None


def rewrite(path, out, *, header=None, **arrays):
    """A copy of the model file at `path` with header changes and arrays replaced (None: gone)."""
    with np.load(path) as npz:
        contents = {name: npz[name] for name in npz.files}
    head = json.loads(str(contents["header"]))
    head["calibration"].update(header or {})
    contents["header"] = np.array(json.dumps(head))
    for name, value in arrays.items():
        if value is None:
            del contents[name]
        else:
            contents[name] = value
    np.savez(out, **contents)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"calibration_precision": np.full((96, 96), np.nan, np.float32)}, "NaN"),
        ({"calibration_mean": np.zeros(95, np.float32)}, "shapes"),
        ({"calibration_std": np.zeros(96, np.float32)}, "positive"),
        ({"calibration_std": None}, "lacks 'calibration_std'"),
        ({"header": {"feature_threshold": -1.0}}, "feature_threshold"),
        ({"header": {"window_rows": "many"}}, "integer"),
    ],
)
def test_a_broken_calibration_is_a_clear_model_file_error(tmp_path, calibrated, change, message):
    calibrated.save(tmp_path / "m.npz")
    broken = rewrite(tmp_path / "m.npz", tmp_path / "broken.npz", **change)
    with pytest.raises(ModelFileError, match=message) as caught:
        BaseModel.load(broken)
    assert "drift calibration unusable" in str(caught.value)


def test_a_calibration_must_fit_the_last_hidden_layer(fan, calibrated):
    _, bare = fan
    narrow = replace(
        calibrated.calibration,
        mean=np.zeros(4, np.float32),
        std=np.ones(4, np.float32),
        precision=np.eye(4, dtype=np.float32),
    )
    with pytest.raises(ValueError, match="width 4"):
        bare.with_calibration(narrow)


def test_thresholds_are_the_quantile_of_the_held_out_windows(fan):
    task, model = fan
    streams = [task.test.X[:300], task.test.X[300:]]
    c = fit_calibration(model, task.pretrain.X, streams, window_rows=64, stride=32, quantile=0.5)
    windows = [score_window(model.with_calibration(c), s[w]) for s in streams
               for w in cyclic_windows(len(s), 64, 32)]  # fmt: skip
    assert c.windows == len(windows) == 10 + 6  # starts 0, 32, ... below 300 and below 170
    assert c.confidence_threshold == pytest.approx(np.median([w.confidence for w in windows]))
    assert c.feature_threshold == pytest.approx(np.median([w.feature for w in windows]))
    assert (c.reference_rows, c.held_out_rows) == (470, 470)


def test_windows_wrap_round_the_end_of_a_stream():
    windows = cyclic_windows(5, 4, 2)
    assert [w.tolist() for w in windows] == [[0, 1, 2, 3], [2, 3, 4, 0], [4, 0, 1, 2]]
    assert cyclic_windows(0, 4, 2) == []


def test_the_held_out_rule_takes_every_fifth_block_of_each_stream():
    streams = np.array([7] * 100 + [3] * 40)
    mask = held_out_blocks(streams)
    first = np.flatnonzero(mask[:100])
    assert first.tolist() == list(range(16, 32)) + list(range(96, 100))  # blocks 1 and 6
    assert np.flatnonzero(mask[100:]).tolist() == list(range(16, 32))  # block 1 of stream 3
    assert not (held_out_blocks(streams, phase=3) & mask).any()
    assert BLOCK_ROWS == 16


def test_pretrain_calibrated_keeps_the_blocks_and_the_unused_rows_out_of_training(data_dir):
    task = load_fan_task(data_dir, "damage1")
    streams = task.pretrain.meta["recording"]
    unused = held_out_blocks(streams, phase=3)
    model = pretrain_calibrated(task.pretrain.X, task.pretrain.y, 3, streams, epochs=2, seed=0,
                                unused=unused)  # fmt: skip
    held = held_out_blocks(streams)
    c = model.calibration
    assert c.held_out_rows == held.sum() and c.reference_rows == len(streams) - held.sum() - 96
    assert c.window_rows == WINDOW_ROWS


@pytest.fixture(scope="module")
def fleet_scores(data_dir):
    """A fan-fleet base model made as simulate's, its scores on in-distribution rows it never
    saw (a fifth of the quiet rooms' blocks) and on the noisy room's recordings."""
    groups = [load_fan_fleet_group(data_dir, g) for g in range(11)]
    quiet = [ds for ds in groups if ds.meta["room"] != "noisy"]
    pool = [ds.subset(ds.meta["recording"] == 0) for ds in quiet]
    X, y = np.concatenate([d.X for d in pool]), np.concatenate([d.y for d in pool])
    streams = np.concatenate([np.full(len(d), k) for k, d in enumerate(pool)])
    unseen = held_out_blocks(streams, phase=3)
    model = pretrain_calibrated(X, y, 3, streams, epochs=20, seed=0, unused=unseen)

    def windows(rows_list):
        return [score_window(model, rows[w]) for rows in rows_list
                for w in cyclic_windows(len(rows), WINDOW_ROWS, 64)]  # fmt: skip

    in_distribution = windows([X[rows] for rows in streams_of(np.flatnonzero(unseen), streams)])
    noisy = windows([ds.X for ds in groups if ds.meta["room"] == "noisy"])
    return in_distribution, noisy


@pytest.mark.parametrize("score", ["confidence_score", "feature_score"])
def test_calibrated_scores_stay_near_one_in_distribution_and_exceed_it_in_the_noisy_room(
    fleet_scores, score
):
    in_distribution, noisy = fleet_scores
    inside = np.array([getattr(w, score) for w in in_distribution])
    drifted = np.array([getattr(w, score) for w in noisy])
    assert np.median(inside) < 1.0 and inside.max() < 2.0, inside
    assert drifted.min() > 1.0 and drifted.min() > inside.max(), drifted


def test_signatures_of_the_noisy_room_sit_away_from_the_quiet_ones(fleet_scores):
    in_distribution, noisy = fleet_scores
    quiet = np.array([w.signature for w in in_distribution])
    loud = np.array([w.signature for w in noisy])
    assert quiet.shape[1] == loud.shape[1] == 96 and quiet.dtype == np.float32
    spread_inside = np.linalg.norm(quiet - quiet.mean(axis=0), axis=1).mean()
    assert np.linalg.norm(loud.mean(axis=0) - quiet.mean(axis=0)) > 1.5 * spread_inside
