"""The agent with a CNN base model: loaded by the kind in its file, fine-tuned into a 4-layer
Skip adapter by the same job handler, and refused cleanly when the file is not a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.data.dataset import Dataset
from agent.errors import BaseModelUnusable
from agent.learner import load_base_model, load_split
from agent.trainer.cnn.finetune import pretrain_cnn
from agent.trainer.cnn.model import CnnModel
from agent.trainer.model import BaseModel
from tests.agent_fixtures import fan_files  # noqa: F401 (a fixture)
from tests.test_agent_handlers import Device, finetune_job
from tests.test_cnn_model import SIDE, toy_images


@dataclass(frozen=True)
class CnnFiles:
    base_model_path: Path
    model: CnnModel
    device_data: Dataset


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory) -> CnnFiles:
    root = tmp_path_factory.mktemp("cnn")
    X, y = toy_images(300)
    model = pretrain_cnn(X, y, 2, architecture="cnn", epochs=2, side=SIDE, batch_size=10)
    model.save(root / "base.npz")
    X, y = toy_images(200, seed=4)
    drifted = X.reshape(-1, SIDE, SIDE).transpose(0, 2, 1).reshape(len(X), -1)  # top <-> left
    return CnnFiles(root / "base.npz", model, Dataset(drifted, y.astype(np.int64), 2))


@pytest.fixture
def device(tmp_path, cnn_files):
    d = Device(tmp_path, cnn_files)
    yield d
    d.spool.close()


def test_the_agent_loads_a_cnn_by_the_kind_in_its_file(cnn_files, fan_files):  # noqa: F811
    model = load_base_model(cnn_files.base_model_path)
    assert isinstance(model, CnnModel) and model.weights_hash == cnn_files.model.weights_hash
    assert isinstance(load_base_model(fan_files.base_model_path), BaseModel)  # no kind: MLP


def test_a_model_of_unknown_kind_is_refused_clearly(tmp_path, cnn_files):
    with np.load(cnn_files.base_model_path) as npz:
        arrays = dict(npz)
    header = json.loads(str(arrays["header"]))
    arrays["header"] = np.array(json.dumps({**header, "kind": "transformer"}))
    np.savez(tmp_path / "odd.npz", **arrays)
    with pytest.raises(BaseModelUnusable, match="unknown model kind 'transformer'"):
        load_base_model(tmp_path / "odd.npz")


def test_device_data_must_have_the_cnns_pixel_count(tmp_path, cnn_files):
    from agent.device_data import write_device_file
    from agent.errors import DataUnusable

    wrong = Dataset(np.zeros((40, 10), np.float32), np.zeros(40, np.int64), 2)
    write_device_file(tmp_path / "device.npz", wrong)
    with pytest.raises(DataUnusable, match="expects 64"):
        load_split(tmp_path / "device.npz", cnn_files.model, 0.25, 0)


def test_a_cnn_fine_tune_job_reports_a_four_layer_adapter_that_helps(device):
    outcome = device.handlers.finetune(finetune_job(epochs=8), device.ctx())
    assert outcome.detail["accuracy_after"] > outcome.detail["accuracy_before"]
    ((_, envelope),) = device.sent()
    arrays = envelope.message.adapter
    assert sorted(arrays) == sorted(f"{p}{k}" for p in "AB" for k in range(1, 5))
    dims = device.learner.model.layer_input_dims
    assert [arrays[f"A{k}"].shape[0] for k in range(1, 5)] == list(dims)
    assert device.learner.adapter(arrays) is not None  # checked against the model it came from
