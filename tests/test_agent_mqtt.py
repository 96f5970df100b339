"""The agent as a process against a real mosquitto (a private one on a free port).

A test client plays the coordinator (tests/agent_process.py): it watches `fleet/#` and sends
jobs. Every wait is on a condition with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import signal
import time

import msgpack
import numpy as np
import pytest

from agent.data.dataset import holdout_split
from agent.trainer.adapter import Adapter
from shared.protocol import encode
from shared.protocol.enums import AdapterOrigin, JobKind, JobReason, JobState, PresenceState
from shared.protocol.messages import (
    CancelParams,
    EvaluateParams,
    FinetuneParams,
    JobStatus,
    Presence,
    Report,
)
from tests.agent_fixtures import drift_files, fan_files, unlabelled_files  # noqa: F401 (fixtures)
from tests.agent_process import (
    DEVICE,
    HOLDOUT_FRACTION,
    SEED,
    WAIT,
    AgentProcess,
    Observer,
    job,
    run_fleet,
)

pytestmark = pytest.mark.slow
REPORT_TOPIC = f"fleet/{DEVICE}/report"


@pytest.fixture
def fleet(mosquitto, fan_files, tmp_path):  # noqa: F811
    yield from run_fleet(mosquitto, fan_files, tmp_path)


def test_presence_is_retained_online_and_the_will_says_offline_after_kill_9(fleet):
    start_agent, observer, mosquitto = fleet
    agent = start_agent()
    online = observer.presence(PresenceState.ONLINE)
    assert online.base_model_hash and online.device["power_source"].startswith("model:")
    late = Observer(mosquitto.port, "late-joiner")  # retained: a later subscriber sees it too
    try:
        late.presence(PresenceState.ONLINE, retained=True)
    finally:
        late.close()
    agent.process.kill()  # SIGKILL: no clean shutdown, only the broker's Will speaks now
    agent.process.wait(WAIT)
    offline = observer.presence(PresenceState.OFFLINE)
    assert offline.boot_id == online.boot_id
    after = Observer(mosquitto.port, "after-death")
    try:
        after.presence(PresenceState.OFFLINE, retained=True)
    finally:
        after.close()


def test_sigterm_announces_offline_and_exits_zero(fleet):
    start_agent, observer, _ = fleet
    agent = start_agent()
    observer.presence(PresenceState.ONLINE)
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    observer.presence(PresenceState.OFFLINE)


def wait_until(condition, explain) -> None:
    """Poll a condition until it holds; fail with explain() after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, explain()
        time.sleep(0.05)


def mtime_ns(path) -> int:
    return path.stat().st_mtime_ns


def test_the_health_file_is_rewritten_while_connected(fleet, tmp_path):
    start_agent, observer, mosquitto = fleet
    health = tmp_path / "health"
    agent = start_agent("--health-file", str(health), "--heartbeat-seconds", "0.5")
    observer.presence(PresenceState.ONLINE)
    wait_until(health.exists, agent.log)
    first = mtime_ns(health)
    wait_until(lambda: mtime_ns(health) != first, lambda: "heartbeats must keep the file fresh")
    mosquitto.stop()  # disconnected: the file must go stale
    wait_until(lambda: "disconnected from" in agent.log(), agent.log)
    # heartbeats go on into the spool while disconnected: count them to know beats happened
    telemetry = f"fleet/{DEVICE}/telemetry"
    beats = lambda: agent.spooled_topics().count(telemetry)  # noqa: E731
    offline = beats()
    # the beat under way at the disconnect (if any) spools at most one row, and the loop is
    # sequential: once a second row is spooled, that beat's touch is done
    wait_until(lambda: beats() >= offline + 2, agent.log)
    stale = mtime_ns(health)
    wait_until(lambda: beats() >= offline + 5, agent.log)  # three more beats, none touches it
    assert mtime_ns(health) == stale, agent.log()


def test_a_finetune_job_succeeds_and_its_adapter_improves_holdout_accuracy(fleet, fan_files):  # noqa: F811
    start_agent, observer, _ = fleet
    start_agent()
    observer.presence(PresenceState.ONLINE)
    observer.send_job(job("ft-1", JobKind.FINETUNE, FinetuneParams(epochs=30, lr=0.05, seed=1)))
    report = observer.wait_for(lambda t, e, r: isinstance(e.message, Report)).message
    metrics = report.metrics
    assert report.job_id == "ft-1" and metrics.accuracy_after > metrics.accuracy_before
    assert metrics.installed is True
    # Check the claim independently: the same hold-out, the model, the reported adapter.
    model = fan_files.model
    _, holdout = holdout_split(fan_files.device_data, HOLDOUT_FRACTION, seed=SEED)
    adapter = Adapter.from_arrays(dict(report.adapter), model.layer_input_dims, model.n_classes)
    base = model.accuracy(holdout.X, holdout.y)
    assert model.accuracy(holdout.X, holdout.y, adapter) == pytest.approx(metrics.accuracy_after)
    assert metrics.accuracy_after > base + 0.2  # the drift is large: ~0.6 -> > 0.9
    evaluate = job("ev-1", JobKind.EVALUATE, EvaluateParams())
    observer.send_job(evaluate)  # the device now runs the new adapter
    assert observer.status_of("ev-1", JobState.SUCCEEDED).detail["accuracy"] == pytest.approx(
        metrics.accuracy_after
    )
    # a job done within 5 s of its arrival sends its end alone: the report, for a fine-tune
    statuses = [e.message for _, e, _ in observer.messages(JobStatus)]
    assert [(s.job_id, s.state) for s in statuses] == [("ev-1", JobState.SUCCEEDED)]


def test_a_report_made_while_the_broker_is_down_arrives_once_after_it_restarts(fleet):
    start_agent, observer, mosquitto = fleet
    agent = start_agent("--in-progress-after-seconds", "0")  # to see it start
    observer.presence(PresenceState.ONLINE)
    # Long enough to still be running when the broker goes away (~1 ms per epoch).
    observer.send_job(
        job("ft-away", JobKind.FINETUNE, FinetuneParams(epochs=3000, lr=0.01, seed=0))
    )
    observer.status_of("ft-away", JobState.IN_PROGRESS)
    mosquitto.stop()
    spooled = lambda: REPORT_TOPIC in agent.spooled_topics()  # noqa: E731
    wait_until(lambda: spooled() or agent.process.poll() is not None, agent.log)
    assert agent.process.poll() is None, agent.log()
    mosquitto.start()
    observer.wait_for(lambda t, e, r: isinstance(e.message, Report))  # the job's end
    # deleted on PUBACK: from then on nothing resends it
    wait_until(lambda: REPORT_TOPIC not in agent.spooled_topics(), agent.log)
    # a beat the agent sends after that comes through the same broker in order behind any
    # copy of the report still on its way
    observer.heartbeat(lambda h: True, after=observer.mark())
    reports = [envelope.message for _, envelope, _ in observer.messages(Report)]
    assert [r.job_id for r in reports] == ["ft-away"], "exactly one report"
    on_wire = [payload for topic, payload in observer.publishes if topic == REPORT_TOPIC]
    assert on_wire and len(set(on_wire)) == len(on_wire), "each publish of it (or chunk) once"


def test_a_finished_job_asked_again_after_a_kill_9_gets_its_kept_result_unchanged(fleet):
    """The coordinator asks again (coordinator.reask) for a job whose result a crashed broker
    may have lost: the restarted agent sends the report it kept (a fine-tune's end), with its
    first (boot id, seq), so the coordinator applies it once; it does not run the job again,
    nor answer with a REJECTED duplicate."""
    start_agent, observer, _ = fleet
    agent = start_agent()
    observer.presence(PresenceState.ONLINE)
    command = job("ft-kept", JobKind.FINETUNE, FinetuneParams(epochs=5, lr=0.05, seed=1))
    observer.send_job(command)
    first = observer.wait_for(lambda t, e, r: isinstance(e.message, Report))
    wait_until(lambda: REPORT_TOPIC not in agent.spooled_topics(), agent.log)  # PUBACKed
    agent.stop(signal.SIGKILL)
    mark = observer.mark()
    restarted = start_agent()
    observer.wait_for(lambda t, e, r: isinstance(e.message, Presence), after=mark)
    asked = observer.mark()
    observer.send_job(command)  # the same command again
    again = observer.wait_for(lambda t, e, r: isinstance(e.message, Report), after=asked)
    assert (again.boot_id, again.seq) == (first.boot_id, first.seq) != (None, None)
    observer.heartbeat(lambda h: True, after=observer.mark())  # sent after any answer to it
    since = [item.envelope.message for item in observer.received[asked:]]
    assert [m for m in since if isinstance(m, JobStatus) and m.job_id == "ft-kept"] == []
    log = restarted.log_path.read_text()
    assert "result sent again" in log and "(finetune): succeeded" not in log  # not run again


def padded_job(job_id: str, **body: object) -> bytes:
    """A valid evaluate job re-packed with changed or extra body fields."""
    envelope = msgpack.unpackb(encode(job(job_id, JobKind.EVALUATE, EvaluateParams()),
                                      sender="coordinator"))  # fmt: skip
    envelope["body"].update(body)
    return msgpack.packb(envelope, use_bin_type=True)


def test_malformed_oversized_and_expired_jobs_are_rejected_and_the_agent_keeps_serving(fleet):
    start_agent, observer, _ = fleet
    start_agent()
    observer.presence(PresenceState.ONLINE)
    observer.send_job(padded_job("bad-1", expires_at="soon"))
    observer.send_job(padded_job("big-1", padding=b"\0" * 64_000))
    observer.send_job(job("old-1", JobKind.EVALUATE, EvaluateParams(), expires_in=-1))
    reasons = {
        job_id: observer.status_of(job_id, JobState.REJECTED)
        for job_id in ("bad-1", "big-1", "old-1")
    }
    assert reasons["bad-1"].reason_code is JobReason.MALFORMED
    assert reasons["big-1"].reason_code is JobReason.MALFORMED
    assert "exceeds" in reasons["big-1"].reason
    assert reasons["old-1"].reason_code is JobReason.EXPIRED
    observer.send_job(job("ok-1", JobKind.EVALUATE, EvaluateParams()))
    accuracy = observer.status_of("ok-1", JobState.SUCCEEDED).detail["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and np.isfinite(accuracy)


def test_mqtt_3_1_1_fallback_serves_jobs(fleet):
    start_agent, observer, _ = fleet
    start_agent("--mqtt-version", "3.1.1")
    observer.presence(PresenceState.ONLINE)
    observer.send_job(job("ev-311", JobKind.EVALUATE, EvaluateParams()))
    assert observer.status_of("ev-311", JobState.SUCCEEDED).detail["holdout_samples"] > 0


def test_a_broker_refusing_the_credentials_ends_the_agent_with_exit_77(fan_files, tmp_path):  # noqa: F811
    from tests.mqtt_broker import MosquittoBroker

    password_file = tmp_path / "passwd"
    password_file.write_text("")  # no accounts at all: every login is refused
    broker = MosquittoBroker(
        tmp_path / "strict",
        extra_config=["allow_anonymous false", f"password_file {password_file}"],
    )
    broker.start()
    try:
        agent = AgentProcess(broker.port, fan_files, tmp_path / "state", tmp_path / "agent.log")
        code = agent.process.wait(WAIT)
        agent.stop()  # closes its log
        assert code == 77, agent.log()
        assert "refused" in agent.log()
    finally:
        broker.stop()


def test_a_cancel_job_stops_a_long_finetune_and_the_agent_serves_the_next_job(fleet):
    start_agent, observer, _ = fleet
    start_agent("--in-progress-after-seconds", "1")
    observer.presence(PresenceState.ONLINE)
    # One-row batches over 10 000 epochs: minutes of training, far past this test's waits.
    long = FinetuneParams(epochs=10_000, lr=0.01, seed=0, batch_size=1)
    observer.send_job(job("ft-long", JobKind.FINETUNE, long))
    observer.status_of("ft-long", JobState.IN_PROGRESS)  # still running 1 s after it arrived
    sent = time.monotonic()
    observer.send_job(job("cancel-1", JobKind.CANCEL, CancelParams("ft-long")))
    accepted = observer.status_of("cancel-1", JobState.SUCCEEDED, timeout=5)
    assert accepted.detail == {"target_job_id": "ft-long", "result": "cancelling_running"}
    failed = observer.status_of("ft-long", JobState.FAILED, timeout=5)
    assert failed.reason_code is JobReason.CANCELED and time.monotonic() - sent < 5
    observer.send_job(job("cancel-2", JobKind.CANCEL, CancelParams("ft-long")))
    late = observer.status_of("cancel-2", JobState.REJECTED)
    assert late.reason_code is JobReason.NOTHING_TO_CANCEL
    assert late.detail["target_state"] == "failed"
    observer.send_job(job("ev-after", JobKind.EVALUATE, EvaluateParams()))
    assert observer.status_of("ev-after", JobState.SUCCEEDED).detail["holdout_samples"] > 0


def test_sigusr1_moves_a_simulated_device_to_its_drifted_data(fleet, drift_files):  # noqa: F811
    start_agent, observer, _ = fleet
    agent = start_agent(
        "--heartbeat-seconds", "0.5", "--stream-rows", "256", data_path=drift_files.device_data_path
    )
    observer.presence(PresenceState.ONLINE)
    quiet = observer.heartbeat(lambda beat: beat.drift_score is not None)
    assert quiet.drifted is False and quiet.drift_score < 1.5
    mark = observer.mark()
    agent.process.send_signal(signal.SIGUSR1)
    noisy = observer.heartbeat(lambda beat: beat.drifted and beat.drift_score > 2.0, after=mark)
    assert noisy.drift_score > 1.5 * quiet.drift_score
    observer.send_job(job("ft-drift", JobKind.FINETUNE, FinetuneParams(epochs=30, lr=0.05, seed=1)))
    metrics = observer.wait_for(lambda t, e, r: isinstance(e.message, Report)).message.metrics
    train, _ = holdout_split(drift_files.noisy, HOLDOUT_FRACTION, seed=SEED)
    assert metrics.samples == len(train)  # the noisy-room rows, not the 1880 quiet ones
    assert metrics.accuracy_before < 0.75 < 0.9 < metrics.accuracy_after
    assert "drift event (SIGUSR1)" in agent.log(tail=100_000)


def test_presence_counts_labelled_rows_and_heartbeats_carry_calibrated_scores(fleet, fan_files):  # noqa: F811
    start_agent, observer, _ = fleet
    start_agent("--heartbeat-seconds", "0.5")
    online = observer.presence(PresenceState.ONLINE)
    train, holdout = holdout_split(fan_files.device_data, HOLDOUT_FRACTION, seed=SEED)
    assert (online.train_samples, online.holdout_samples) == (len(train), len(holdout))
    assert online.labelled is True
    beat = observer.heartbeat(lambda b: b.signature is not None)
    assert beat.signature.dtype == np.float32 and beat.signature.shape == (96,)
    assert beat.signature_rows == 256 and beat.adapter_origin is AdapterOrigin.BASE
    assert beat.confidence_score > 1.0 and beat.feature_score > 1.0  # the noisy room


def test_a_device_without_labels_rejects_a_finetune_and_still_sends_its_signature(
    fleet,
    unlabelled_files,  # noqa: F811
):
    start_agent, observer, _ = fleet
    agent = start_agent("--heartbeat-seconds", "0.5", data_path=unlabelled_files.device_data_path)
    online = observer.presence(PresenceState.ONLINE)
    assert (online.train_samples, online.holdout_samples) == (0, 0) and online.labelled is False
    observer.send_job(
        job("ft-nolabel", JobKind.FINETUNE, FinetuneParams(epochs=5, lr=0.05, seed=0))
    )
    rejected = observer.status_of("ft-nolabel", JobState.REJECTED)
    assert rejected.reason_code is JobReason.INSUFFICIENT_DATA and "no labels" in rejected.reason
    beat = observer.heartbeat(lambda b: b.signature is not None)
    assert beat.signature.shape == (96,) and beat.feature_score > 1.0
    assert "has no labels" in agent.log(tail=100_000)
