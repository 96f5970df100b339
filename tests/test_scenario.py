"""The simulated fleet's data: a calibrated base model, one valid device file per device, drift
streams."""

import numpy as np
import pytest

from agent.device_data import load_device_data
from agent.trainer.model import BaseModel
from shared.topics import validate_device_id
from skipfleet.scenario import build_scenario


@pytest.mark.parametrize("dataset", ["har", "fan"])
@pytest.mark.parametrize("drift", [False, True])
def test_scenario_writes_a_base_model_and_device_files(tmp_path, data_dir, dataset, drift):
    scenario = build_scenario(dataset, 3, data_dir, tmp_path, drift=drift, pretrain_epochs=2,
                              log=lambda _: None)  # fmt: skip
    model = BaseModel.load(scenario.base_model)
    assert model.weights_hash == scenario.base_model_hash
    assert model.calibration.window_rows == 256 and model.calibration.held_out_rows > 0
    ids = [d.device_id for d in scenario.devices]
    assert len(set(ids)) == 3
    for device in scenario.devices:
        validate_device_id(device.device_id)
        data = load_device_data(device.data_file, model.n_classes)
        assert data.X.shape[1] == model.n_inputs and len(data) > 50
        with np.load(device.data_file) as arrays:
            assert ("X_drift" in arrays.files) == device.drifts
    if drift:
        assert any(d.drifts for d in scenario.devices)


def test_fmnist_devices_each_see_their_own_rotation_through_a_cnn(tmp_path, data_dir):
    from agent.drift import score_window
    from agent.learner import load_base_model
    from agent.trainer.cnn.model import CnnModel
    from coordinator.clustering import rms_distance

    scenario = build_scenario("fmnist", 4, data_dir, tmp_path, drift=True, pretrain_epochs=1,
                              log=lambda _: None)  # fmt: skip
    model = load_base_model(scenario.base_model)
    assert isinstance(model, CnnModel) and model.weights_hash == scenario.base_model_hash
    ids = [d.device_id for d in scenario.devices]
    assert ids == ["fmnist-r00-0", "fmnist-r30-0", "fmnist-r75-0", "fmnist-r00-1"]
    assert [d.drifts for d in scenario.devices] == [False, True, True, False]  # upright: no drift
    accuracy = {}
    for device in scenario.devices:
        with np.load(device.data_file) as arrays:
            assert arrays["X"].shape == (1365, 784)
            if device.drifts:  # the same images, turned
                assert not np.array_equal(arrays["X"], arrays["X_drift"])
                accuracy[device.device_id] = model.accuracy(arrays["X_drift"], arrays["y_drift"])
            else:
                accuracy[device.device_id] = model.accuracy(arrays["X"], arrays["y"])
    assert accuracy["fmnist-r00-0"] > 0.6 > accuracy["fmnist-r30-0"] > accuracy["fmnist-r75-0"]
    # calibrated on upright images it never trained on: a turned camera's confidence score is
    # above the threshold (1.0), an upright one's below, and the signatures tell them apart
    scores = {}
    for device in scenario.devices:
        with np.load(device.data_file) as arrays:
            scores[device.device_id] = score_window(model, arrays["X_drift" if device.drifts
                                                                else "X"][:256])  # fmt: skip
    assert scores["fmnist-r00-0"].confidence_score < 1.0 < scores["fmnist-r30-0"].confidence_score
    assert scores["fmnist-r75-0"].confidence_score > 1.0
    upright = [scores[d].signature for d in ("fmnist-r00-0", "fmnist-r00-1")]
    turned = scores["fmnist-r75-0"].signature
    assert rms_distance(upright[0], upright[1]) < 0.5 * rms_distance(upright[0], turned)


def test_har_devices_are_people_the_base_model_never_saw(tmp_path, data_dir):
    scenario = build_scenario("har", 5, data_dir, tmp_path, drift=False, pretrain_epochs=1,
                              log=lambda _: None)  # fmt: skip
    assert [d.device_id for d in scenario.devices] == [
        "har-s09", "har-s14", "har-s16", "har-s19", "har-s25",
    ]  # fmt: skip
    pretrained_on = set(BaseModel.load(scenario.base_model).info["pretrain_subjects"])
    # three more are held out for devices that join later, without labels
    assert len(pretrained_on) == 22 and not pretrained_on & {9, 14, 16, 19, 25, 2, 4, 6}


def test_new_devices_have_no_labels_and_the_simulation_keeps_their_truth(tmp_path, data_dir):
    scenario = build_scenario("fan", 8, data_dir, tmp_path, drift=True, pretrain_epochs=1,
                              new_devices=2, log=lambda _: None)  # fmt: skip
    assert [d.device_id for d in scenario.new_devices] == [
        "fan-12cm-noisy-normal-new", "fan-12cm-noisy-damage1-new",
    ]  # fmt: skip
    for device in scenario.new_devices:
        assert not device.labelled
        with np.load(device.data_file) as inputs, np.load(device.truth_file) as truth:
            assert "y" not in inputs.files and len(truth["y"]) == len(inputs["X"])
    # drifting devices stream the noisy room's first recordings, new ones its second
    drifting = next(d for d in scenario.devices if "normal ->" in d.description)
    with np.load(drifting.data_file) as own, np.load(scenario.new_devices[0].data_file) as new:
        shared = {row.tobytes() for row in own["X_drift"]} & {row.tobytes() for row in new["X"]}
    assert not shared
    with pytest.raises(ValueError, match="new devices"):
        build_scenario("fan", 2, data_dir, tmp_path, drift=True, pretrain_epochs=1,
                       new_devices=4, log=lambda _: None)  # fmt: skip


def test_more_devices_than_groups_split_the_data(tmp_path, data_dir):
    scenario = build_scenario("fan", 13, data_dir, tmp_path, drift=False, pretrain_epochs=1,
                              log=lambda _: None)  # fmt: skip
    assert len({d.device_id for d in scenario.devices}) == 13
    assert scenario.devices[0].device_id.endswith("-0")


def test_scenario_refuses_bad_requests(tmp_path, data_dir):
    with pytest.raises(ValueError, match="har, fan or fmnist"):
        build_scenario("mnist", 2, data_dir, tmp_path, drift=False)
    with pytest.raises(ValueError, match="at least one"):
        build_scenario("fan", 0, data_dir, tmp_path, drift=False)


def test_prepare_writes_the_compose_layout(tmp_path, data_dir):
    import json

    from skipfleet.cli import main

    out = tmp_path / "fleet"
    argv = ["prepare", "--dataset", "fan", "--devices", "3", "--out", str(out),
            "--data-dir", str(data_dir)]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    model = BaseModel.load(out / "base.npz")
    assert model.calibration is not None  # the agents on the shards send calibrated scores
    assert manifest["base_model_hash"] == model.weights_hash
    assert [s["shard"] for s in manifest["shards"]] == [0, 1, 2]
    for k in range(3):
        assert len(load_device_data(out / "shards" / f"shard-{k}.npz", model.n_classes)) > 50
