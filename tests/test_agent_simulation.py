"""Simulated devices: the sensor stream, the drift switch, their effect on drift and training."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from agent.adapter_inbox import AdapterInbox
from agent.adapter_store import AdapterStore
from agent.data.dataset import Dataset, holdout_split
from agent.drift import WINDOW_ROWS as DRIFT_WINDOW_ROWS
from agent.drift import RecentInputs
from agent.handlers import JobHandlers
from agent.job_history import JobHistory
from agent.jobs import JobContext, JobRunner
from agent.learner import Learner
from agent.local_data import DataPhase, LocalData, SwitchResult, load_local_data
from agent.meters import GENERIC, ModelMeter
from agent.simulation import DriftTrigger, SensorStream
from agent.spool import Spool
from agent.telemetry import Telemetry, TelemetrySources
from agent.uplink import Uplink
from shared.protocol.enums import JobKind
from shared.protocol.messages import FinetuneParams, Job
from shared.topics import Topics
from tests.agent_fixtures import drift_files, fan_files, own_choice  # noqa: F401 (fixtures)

WAIT = 10.0


def tiny_phase(start: float, rows: int, drifted: bool) -> DataPhase:
    """A phase whose row i is the single feature `start + i`, so streamed rows name themselves."""
    X = (start + np.arange(rows, dtype=np.float32)).reshape(rows, 1)
    data = Dataset(X, np.arange(rows, dtype=np.int64) % 2, 2)
    train, holdout = holdout_split(data, 0.25, seed=0)
    return DataPhase(Learner(None, train, holdout), X, drifted)


def wait_until(condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_the_switch_is_one_way_and_refused_without_drifted_rows():
    assert LocalData(tiny_phase(0, 8, False)).switch_to_drift() is SwitchResult.UNAVAILABLE
    data = LocalData(tiny_phase(0, 8, False), tiny_phase(100, 8, True))
    assert not data.current().drifted
    assert data.switch_to_drift() is SwitchResult.SWITCHED
    assert data.current().drifted and data.current().stream[0, 0] == 100
    assert data.switch_to_drift() is SwitchResult.ALREADY_DRIFTED


def test_the_stream_cycles_through_the_rows_and_continues_from_the_drifted_ones():
    data = LocalData(tiny_phase(0, 5, False), tiny_phase(100, 8, True))
    recent = RecentInputs(capacity=64, n_features=1)
    stream = SensorStream(data, recent, rows=3)
    stream.step()
    stream.step()  # rows 0..5 of a 5-row stream: it wraps around
    assert recent.snapshot().ravel().tolist() == [0, 1, 2, 3, 4, 0]
    data.switch_to_drift()
    stream.step()
    assert recent.snapshot().ravel()[-3:].tolist() == [100, 101, 102]
    SensorStream(data, recent, rows=0).step()  # off: observes nothing
    assert len(recent) == 9


def test_drift_at_switches_after_the_delay_and_a_request_switches_at_once(caplog):
    timed = LocalData(tiny_phase(0, 8, False), tiny_phase(100, 8, True))
    trigger = DriftTrigger(timed, at_seconds=0.05)
    trigger.start()
    try:
        wait_until(lambda: timed.current().drifted)
    finally:
        trigger.stop()
    asked = LocalData(tiny_phase(0, 8, False), tiny_phase(100, 8, True))
    trigger = DriftTrigger(asked)  # no --drift-at: only a request (SIGUSR1) switches
    trigger.start()
    try:
        trigger.request()
        wait_until(lambda: asked.current().drifted)
    finally:
        trigger.stop()
    assert "drift event (SIGUSR1)" in caplog.text


def test_a_request_without_drifted_rows_is_refused_in_the_log(caplog):
    data = LocalData(tiny_phase(0, 8, False))
    with caplog.at_level(logging.ERROR):
        assert DriftTrigger(data).switch("SIGUSR1") is SwitchResult.UNAVAILABLE
    assert "refused: the device data has no X_drift/y_drift" in caplog.text
    assert not data.current().drifted


@pytest.fixture
def device(tmp_path, drift_files):  # noqa: F811
    """The quiet-then-noisy fan device, as the agent builds it, with a 256-row drift window."""
    model = drift_files.model
    data = load_local_data(drift_files.device_data_path, model, 0.25, 0)
    spool = Spool(tmp_path / "spool.sqlite", max_messages=100)
    store = AdapterStore(tmp_path / "adapters", model.weights_hash)
    meter = ModelMeter(GENERIC)
    runner = JobRunner({}, lambda s: None, JobHistory(tmp_path / "j.json"), base_model_hash="h")
    recent = RecentInputs(DRIFT_WINDOW_ROWS, model.n_inputs)
    recent.add(data.current().stream)
    sources = TelemetrySources(
        meter,
        spool,
        runner,
        store,
        data.current().learner,
        recent,
        lambda: 0,
        drifted=lambda: data.current().drifted,
    )
    uplink = Uplink("dev-1", Topics(), spool, boot_id="b")
    handlers = JobHandlers(
        data, store, AdapterInbox(), uplink, meter, choice=own_choice(store, tmp_path)
    )
    yield data, Telemetry(sources), SensorStream(data, recent, DRIFT_WINDOW_ROWS), handlers
    spool.close()


def test_the_heartbeat_drift_score_rises_clearly_after_the_switch(device, drift_files):  # noqa: F811
    data, telemetry, stream, _ = device
    assert data.can_drift and len(data.current().stream) == len(drift_files.quiet)
    stream.step()
    quiet = telemetry.heartbeat()
    assert quiet.drifted is False and quiet.drift_score < 1.5
    DriftTrigger(data).switch("test")
    stream.step()  # one beat observes a whole window of noisy-room rows
    noisy = telemetry.heartbeat()
    assert noisy.drifted is True and noisy.drift_score > 2.0
    assert noisy.drift_score > 1.5 * quiet.drift_score


def finetune_job(job_id: str) -> Job:
    params = FinetuneParams(epochs=30, lr=0.05, seed=1)
    return Job(job_id, JobKind.FINETUNE, params, expires_at=time.time() + 600)


def test_a_finetune_after_the_switch_trains_and_holds_out_on_the_drifted_rows(device):
    data, _, _, handlers = device
    data.switch_to_drift()
    drifted = data.current().learner
    ctx = JobContext(cancel=threading.Event(), progress=lambda fraction: None)
    detail = handlers.finetune(finetune_job("ft-noisy"), ctx).detail
    assert detail["samples"] == len(drifted.train)
    assert detail["accuracy_before"] < 0.75 < 0.9 < detail["accuracy_after"]


def test_a_finetune_running_at_the_switch_finishes_on_the_data_it_started_with(device):
    data, _, _, handlers = device
    quiet = data.current().learner

    def switch_midway(fraction: float) -> None:
        data.switch_to_drift()

    ctx = JobContext(cancel=threading.Event(), progress=switch_midway)
    detail = handlers.finetune(finetune_job("ft-quiet"), ctx).detail
    assert data.current().drifted  # switched during the job...
    assert detail["samples"] == len(quiet.train)  # ...which still trained on the quiet rows
    assert detail["accuracy_before"] == quiet.holdout_accuracy(None) > 0.9
