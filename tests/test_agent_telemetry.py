"""The heartbeat: power from the meter, spool counters, drift scores, signature, adapter and job
state."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from agent.adapter_store import AdapterSource, AdapterStore
from agent.data.dataset import holdout_split
from agent.data.fan import load_fan_split
from agent.drift import RecentInputs
from agent.job_history import JobHistory
from agent.jobs import JobRunner
from agent.learner import Learner
from agent.meters import RPI_ZERO_2W, ModelMeter
from agent.spool import Priority, Spool
from agent.telemetry import HeartbeatLoop, Telemetry, TelemetrySources
from shared.protocol.enums import AdapterOrigin
from tests.agent_fixtures import fan_files, good_arrays  # noqa: F401 (fixtures)


@pytest.fixture
def parts(tmp_path, fan_files):  # noqa: F811
    model = fan_files.model
    train, holdout = holdout_split(fan_files.device_data, 0.25, seed=0)
    spool = Spool(tmp_path / "s.sqlite", max_messages=10)
    clock = {"wall": 0.0, "cpu": 0.0}
    meter = ModelMeter(
        RPI_ZERO_2W, wall_clock=lambda: clock["wall"], cpu_clock=lambda: clock["cpu"]
    )
    store = AdapterStore(tmp_path / "adapters", model.weights_hash)
    runner = JobRunner({}, lambda s: None, JobHistory(tmp_path / "j.json"), base_model_hash="h")
    recent = RecentInputs(64, model.n_inputs)
    sources = TelemetrySources(
        meter,
        spool,
        runner,
        store,
        Learner(model, train, holdout),
        recent,
        cache_bytes=lambda: 1234,
    )
    (tmp_path / "root/sys/class/thermal/thermal_zone0").mkdir(parents=True)
    (tmp_path / "root/sys/class/thermal/thermal_zone0/temp").write_text("43500\n")
    telemetry = Telemetry(sources, root=tmp_path / "root", clock=lambda: clock["wall"])
    yield telemetry, sources, clock, fan_files
    spool.close()


def test_heartbeat_reports_power_energy_spool_and_temperature(parts):
    telemetry, sources, clock, _ = parts
    for _ in range(12):  # 2 over the bound of 10: two dropped
        sources.spool.put("t", b"x", priority=Priority.TELEMETRY)
    clock["wall"], clock["cpu"] = 10.0, 10.0  # one core busy for 10 s
    beat = telemetry.heartbeat()
    assert beat.power_w == pytest.approx(1.455)
    assert beat.energy_j_total == pytest.approx(14.55)
    assert beat.power_source == "model:rpi-zero-2w"
    assert (beat.spool_depth, beat.spool_dropped, beat.cache_bytes) == (10, 2, 1234)
    assert beat.temperature_c == 43.5 and beat.uptime_s == 10.0
    assert beat.drift_score is None and beat.adapter_version is None
    clock["wall"] = 20.0  # idle for 10 s
    assert telemetry.heartbeat().power_w == pytest.approx(0.60)


def test_drift_is_higher_on_the_drifted_device_data_than_on_pretraining_like_data(parts, data_dir):
    telemetry, sources, _, files = parts
    sources.recent.add(load_fan_split(data_dir, "damage1", "pretrain").X)
    in_distribution = telemetry.heartbeat().drift_score
    sources.recent.add(files.device_data.X)
    drifted = telemetry.heartbeat().drift_score
    assert in_distribution < 1.5 < drifted


def test_heartbeat_names_the_running_adapter_version(parts):
    telemetry, sources, _, files = parts
    dims = files.model.layer_input_dims
    arrays = {"delta3": np.zeros((dims[2], 3), np.float32)}
    sources.store.install(
        arrays,
        version=12,
        base_model_hash=files.model.weights_hash,
        source=AdapterSource.COORDINATOR,
    )
    assert telemetry.heartbeat().adapter_version == 12


def test_heartbeat_loop_sends_until_stopped_and_survives_a_failure(parts):
    telemetry, *_ = parts
    sent, calls = [], []

    def send(beat):
        calls.append(beat)
        if len(calls) == 1:
            raise RuntimeError("spool hiccup")
        sent.append(beat)

    loop = HeartbeatLoop(telemetry, send, interval=0.01)
    loop.start()
    deadline = time.monotonic() + 5
    while len(sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    assert len(sent) >= 2


def test_heartbeat_carries_calibrated_scores_a_signature_and_the_adapter_origin(parts, data_dir):
    telemetry, sources, _, files = parts
    quiet = load_fan_split(data_dir, "damage1", "silent_all")
    sources.recent.add(quiet.X[quiet.meta["recording"] == "12cm_hmlo_normal_silentB_2"])
    calm = telemetry.heartbeat()
    assert calm.adapter_origin is AdapterOrigin.BASE
    assert calm.signature.shape == (files.model.hidden_width,) and calm.signature_rows == 64
    sources.recent.add(files.device_data.X)  # the noisy room
    loud = telemetry.heartbeat()
    assert calm.confidence_score < 1.0 < loud.confidence_score
    assert calm.feature_score < 1.0 < loud.feature_score
    assert np.linalg.norm(loud.signature) > np.linalg.norm(calm.signature)


def test_scores_use_the_running_adapter(parts, good_arrays):  # noqa: F811
    telemetry, sources, _, files = parts
    sources.recent.add(files.device_data.X)
    before = telemetry.heartbeat()
    sources.store.install(good_arrays, version=None, base_model_hash=files.model.weights_hash,
                          source=AdapterSource.FINETUNE)  # fmt: skip
    after = telemetry.heartbeat()
    assert after.adapter_origin is AdapterOrigin.PERSONAL
    assert after.confidence_score < before.confidence_score  # the adapter knows this room
    assert after.feature_score == pytest.approx(before.feature_score)  # x3 is the base model's
    np.testing.assert_array_equal(after.signature, before.signature)


def test_without_a_calibration_the_heartbeat_has_no_calibrated_scores(parts):
    telemetry, sources, _, files = parts
    sources.learner = Learner(replace(files.model, calibration=None), sources.learner.train,
                              sources.learner.holdout)  # fmt: skip
    sources.recent.add(files.device_data.X)
    beat = telemetry.heartbeat()
    assert beat.drift_score is not None and beat.adapter_origin is AdapterOrigin.BASE
    assert (beat.confidence_score, beat.feature_score, beat.signature) == (None, None, None)
    assert beat.signature_rows is None


def test_a_window_not_yet_full_carries_no_calibrated_scores(parts):
    telemetry, sources, _, files = parts
    sources.recent.add(files.device_data.X[:10])  # 10 of the 64 rows the thresholds expect
    partial = telemetry.heartbeat()
    assert partial.drift_score is not None
    assert (partial.confidence_score, partial.feature_score, partial.signature) == (None,) * 3
    sources.recent.add(files.device_data.X[10:64])
    full = telemetry.heartbeat()
    assert full.confidence_score is not None and full.signature_rows == 64
