"""The job handlers with the real trainer: fine-tune, evaluate, apply, roll back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.adapter_inbox import AdapterInbox
from agent.adapter_store import AdapterSource, AdapterStore
from agent.data.dataset import holdout_split
from agent.handlers import JobHandlers
from agent.jobs import JobContext, JobFailed, JobRejected
from agent.learner import Learner
from agent.local_data import DataPhase, LocalData
from agent.meters import GENERIC, ModelMeter
from agent.spool import Spool
from agent.trainer.errors import Cancelled
from agent.uplink import Uplink
from shared.protocol import decode
from shared.protocol.enums import JobKind, JobReason
from shared.protocol.messages import (
    BASE_MODEL_VERSION,
    AdapterPublication,
    ApplyAdapterParams,
    EvaluateParams,
    FetchRequest,
    FinetuneParams,
    Job,
    Lineage,
    Report,
    RollbackAdapterParams,
)
from shared.topics import Topics
from tests.agent_fixtures import fan_files  # noqa: F401 (a fixture)

EXPIRES = time.time() + 3600


class Device:
    def __init__(self, tmp_path, files):
        model = files.model
        train, holdout = holdout_split(files.device_data, 0.25, seed=0)
        self.learner = Learner(model, train, holdout)
        self.spool = Spool(tmp_path / "spool.sqlite", max_messages=100)
        self.store = AdapterStore(tmp_path / "adapters", model.weights_hash)
        self.inbox = AdapterInbox()
        uplink = Uplink("dev-1", Topics(), self.spool, boot_id="boot1")
        self.handlers = JobHandlers(
            LocalData(DataPhase(self.learner, files.device_data.X, drifted=False)),
            self.store,
            self.inbox,
            uplink,
            ModelMeter(GENERIC),
            fetch_timeout_seconds=1.0,
        )
        self.cancel = threading.Event()
        self.progress: list[float] = []

    def ctx(self):
        return JobContext(cancel=self.cancel, progress=self.progress.append)

    def sent(self):
        return [(item.topic, decode(item.payload)) for item in self.spool.pending(100)]

    def publication(self, version, base_hash=None, scale=0.0):
        dims, classes = self.learner.model.layer_input_dims, self.learner.model.n_classes
        arrays = {
            f"delta{k + 1}": np.full((d, classes), scale, np.float32) for k, d in enumerate(dims)
        }
        return AdapterPublication(
            version,
            base_hash or self.learner.model.weights_hash,
            "default",
            arrays,
            Lineage("r1", ("dev-1",), "fedavg"),
            0.0,
        )


@pytest.fixture
def device(tmp_path, fan_files):  # noqa: F811
    d = Device(tmp_path, fan_files)
    yield d
    d.spool.close()


def finetune_job(job_id="ft1", **params):
    defaults = {"epochs": 20, "lr": 0.05, "seed": 0}
    return Job(job_id, JobKind.FINETUNE, FinetuneParams(**{**defaults, **params}), EXPIRES)


def test_finetune_reports_an_adapter_that_beats_the_base_model(device):
    outcome = device.handlers.finetune(finetune_job(), device.ctx())
    detail = outcome.detail
    assert detail["accuracy_before"] < 0.8 < detail["accuracy_after"]
    assert detail["installed"] and detail["joules"] > 0
    assert detail["power_source"] == "model:generic"
    assert device.progress and device.progress[-1] == 1.0
    ((topic, envelope),) = device.sent()
    report = envelope.message
    assert topic == "fleet/dev-1/report" and isinstance(report, Report)
    assert (envelope.boot_id, envelope.sender) == ("boot1", "dev-1")
    assert report.metrics.accuracy_after == detail["accuracy_after"]
    assert report.metrics.samples == len(device.learner.train)
    stored = device.store.current
    assert stored.meta.source is AdapterSource.FINETUNE and stored.meta.version is None
    assert (
        device.learner.holdout_accuracy(device.learner.adapter(report.adapter))
        == (detail["accuracy_after"])
    )


def test_finetune_with_an_unknown_method_is_rejected(device):
    with pytest.raises(JobRejected) as caught:
        device.handlers.finetune(finetune_job(method="ft-all"), device.ctx())
    assert caught.value.reason_code is JobReason.INVALID_PARAMS
    assert device.sent() == []


def test_cancel_stops_a_finetune_between_epochs(device):
    def progress(fraction):
        device.cancel.set()

    ctx = JobContext(cancel=device.cancel, progress=progress)
    with pytest.raises(Cancelled):
        device.handlers.finetune(finetune_job(epochs=500), ctx)
    assert device.store.current is None and device.sent() == []


def test_evaluate_the_running_adapter(device):
    outcome = device.handlers.evaluate(
        Job("ev", JobKind.EVALUATE, EvaluateParams(), EXPIRES), device.ctx()
    )
    assert outcome.detail["adapter_version"] is None
    assert outcome.detail["accuracy"] == device.learner.holdout_accuracy(None)


def test_evaluate_the_base_model_alone_while_an_adapter_runs(device):
    device.handlers.finetune(finetune_job(), device.ctx())
    assert device.store.current is not None  # the device now runs its own adapter
    outcome = device.handlers.evaluate(
        Job("ev0", JobKind.EVALUATE, EvaluateParams(BASE_MODEL_VERSION), EXPIRES), device.ctx()
    )
    assert outcome.detail["adapter_version"] == BASE_MODEL_VERSION
    assert outcome.detail["accuracy"] == device.learner.holdout_accuracy(None)
    assert device.store.current is not None  # evaluating never switches


def test_apply_a_published_version_then_roll_back(device):
    device.handlers.finetune(finetune_job(), device.ctx())
    device.inbox.put(device.publication(7))
    apply = Job("ap", JobKind.APPLY_ADAPTER, ApplyAdapterParams(7), EXPIRES)
    assert device.handlers.apply_adapter(apply, device.ctx()).detail["adapter_version"] == 7
    assert device.store.current.meta.version == 7
    again = device.handlers.apply_adapter(apply, device.ctx())
    assert again.detail["already_running"] is True
    back = device.handlers.rollback_adapter(
        Job("rb", JobKind.ROLLBACK_ADAPTER, RollbackAdapterParams(), EXPIRES), device.ctx()
    )
    assert back.detail["source"] == "finetune"


def test_apply_for_another_base_model_is_rejected(device):
    device.inbox.put(device.publication(3, base_hash="f" * 64))
    with pytest.raises(JobRejected) as caught:
        device.handlers.apply_adapter(
            Job("ap", JobKind.APPLY_ADAPTER, ApplyAdapterParams(3), EXPIRES), device.ctx()
        )
    assert caught.value.reason_code is JobReason.BASE_MODEL_MISMATCH
    assert device.store.current is None


def test_apply_fetches_a_missing_version_and_waits_for_it(device):
    timer = threading.Timer(0.2, device.inbox.put, [device.publication(9, scale=0.01)])
    timer.start()
    outcome = device.handlers.apply_adapter(
        Job("ap", JobKind.APPLY_ADAPTER, ApplyAdapterParams(9), EXPIRES), device.ctx()
    )
    timer.join()
    assert outcome.detail["adapter_version"] == 9
    ((topic, envelope),) = device.sent()
    assert topic == "fleet/dev-1/fetch" and envelope.message == FetchRequest(9)


def test_apply_fails_when_the_version_never_arrives(device):
    with pytest.raises(JobFailed) as caught:
        device.handlers.apply_adapter(
            Job("ap", JobKind.APPLY_ADAPTER, ApplyAdapterParams(4), EXPIRES), device.ctx()
        )
    assert caught.value.reason_code is JobReason.ADAPTER_UNAVAILABLE


def test_rollback_without_a_previous_adapter_is_rejected(device):
    with pytest.raises(JobRejected) as caught:
        device.handlers.rollback_adapter(
            Job("rb", JobKind.ROLLBACK_ADAPTER, RollbackAdapterParams(), EXPIRES), device.ctx()
        )
    assert caught.value.reason_code is JobReason.ADAPTER_UNAVAILABLE


def test_an_adapter_that_does_not_fit_the_model_is_rejected(device):
    bad = device.publication(5)
    bad = AdapterPublication(
        5,
        bad.base_model_hash,
        "default",
        {"delta1": np.zeros((3, 3), np.float32)},
        bad.lineage,
        0.0,
    )
    device.inbox.put(bad)
    with pytest.raises(JobRejected) as caught:
        device.handlers.apply_adapter(
            Job("ap", JobKind.APPLY_ADAPTER, ApplyAdapterParams(5), EXPIRES), device.ctx()
        )
    assert caught.value.reason_code is JobReason.MALFORMED
