"""The load generator's simulated devices: their protocol without a broker (a fake clock, a list
for what they publish), then a few of them against the real coordinator on the session's Ray,
and `skipfleet bench coordinator` end to end on three devices."""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from agent.data.dataset import Dataset
from agent.data.fan import load_fan_split
from agent.device_data import write_device_file
from agent.telemetry import THERMAL_ZONE
from agent.trainer.finetune import pretrain
from coordinator.app import Coordinator
from coordinator.config import CoordinatorConfig, FinetuneSettings
from coordinator.federation import FederationPolicy
from coordinator.rollout import RolloutPolicy
from coordinator.scheduler import SchedulerPolicy
from shared.mqtt import parse_broker_url
from shared.protocol import (
    BASE_MODEL_VERSION,
    AdapterPublication,
    ApplyAdapterParams,
    CancelParams,
    DesiredState,
    EvaluateParams,
    FetchRequest,
    FinetuneParams,
    Heartbeat,
    Job,
    JobKind,
    JobReason,
    JobState,
    JobStatus,
    Lineage,
    Presence,
    Report,
    decode,
    encode,
    encode_for_publish,
)
from shared.protocol.enums import PresenceState
from shared.topics import TopicKind
from skipfleet.coordinator_process import ApiClient
from skipfleet.loadgen.device import DeviceSettings, HostTemperature, SimulatedDevice
from skipfleet.loadgen.fleet import SimulatedFleet, split
from skipfleet.loadgen.process import InstallLog
from skipfleet.loadgen.reference import REPORT_VARIANTS, Evaluator, perturbed, run_reference
from skipfleet.measure import (
    CpuWindow,
    by_label,
    cpu_by_process,
    memory_by_role,
    memory_of,
    parse_prometheus,
    role_of,
    total,
)
from skipfleet.probe import FleetProbe

DEVICE = "sim-00007"
SECONDS = 2.0  # a simulated fine-tune


class ManualTimers:
    """The event loop's timers on a clock the test moves."""

    class Handle:
        def __init__(self) -> None:
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self) -> None:
        self.now = 100.0
        self._due: list = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback) -> Handle:
        handle = self.Handle()
        heapq.heappush(self._due, (self.now + delay, next(self._order), handle, callback))
        return handle

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self._due and self._due[0][0] <= end:
            at, _, handle, callback = heapq.heappop(self._due)
            self.now = max(self.now, at)
            if not handle.cancelled:
                callback()
        self.now = end


@pytest.fixture(scope="module")
def world(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loadgen-world")
    silent = load_fan_split(data_dir, "damage1", "pretrain")
    noisy = load_fan_split(data_dir, "damage1", "finetune")
    pretrain(silent.X, silent.y, 3, epochs=20, lr=0.05, seed=0).save(root / "base.npz")
    write_device_file(root / "device.npz", Dataset(noisy.X, noisy.y, 3, {}))
    return root


@pytest.fixture(scope="module")
def reference(world):
    return run_reference(world / "base.npz", world / "device.npz", epochs=10, lr=0.02)


class Bench:
    """One simulated device, what it published (decoded), and what it installed."""

    def __init__(self, reference, device_seconds: float = SECONDS, **settings) -> None:
        self.timers = ManualTimers()
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.installs: list[tuple[int | None, str]] = []
        self.evaluator = Evaluator(reference.learner)
        self.reference = reference
        self.device = SimulatedDevice(
            DEVICE, 7, reference, self.evaluator,
            DeviceSettings(device_seconds=device_seconds, **settings), self.timers,
            lambda *publish: self.published.append(publish), boot_id="boot-1",
            on_install=lambda device, version, how: self.installs.append((version, how)),
            rng=random.Random(0),  # heartbeat phase and fetch waits: the same every run
        )  # fmt: skip

    def deliver(self, kind: str, message, **headers) -> None:
        topic = f"fleet/{DEVICE}/{kind}"
        self.device.on_message(topic, encode(message, sender="coordinator", **headers))

    def job(self, kind: JobKind, params, *, expires_in: float = 60.0, job_id=None) -> Job:
        job = Job(job_id or uuid.uuid4().hex, kind, params, time.time() + expires_in,
                  self.reference.base_model_hash)  # fmt: skip
        self.deliver("cmd/job", job)
        return job

    def envelopes(self):
        return [decode(payload) for _, payload, _, _ in self.published]

    def messages(self, cls) -> list:
        return [e.message for e in self.envelopes() if isinstance(e.message, cls)]

    def statuses(self, job_id: str) -> list[JobStatus]:
        return [s for s in self.messages(JobStatus) if s.job_id == job_id]

    def states(self, job_id: str) -> list[tuple[JobState, JobReason | None]]:
        return [(s.state, s.reason_code) for s in self.statuses(job_id)]

    def publication(self, version: int, arrays=None) -> AdapterPublication:
        return AdapterPublication(
            version, self.reference.base_model_hash, "default",
            arrays or {f"delta{k}": np.zeros((d, 3), np.float32) for k, d in
                       enumerate(self.reference.learner.model.layer_input_dims, start=1)},
            Lineage("round-1", (DEVICE,), "exact-delta"), time.time(),
        )  # fmt: skip


def finetune_params(seed: int = 1) -> FinetuneParams:
    return FinetuneParams(epochs=10, lr=0.02, seed=seed)


# -- the reference run -------------------------------------------------------------------------
def test_the_reference_is_a_real_fine_tune_and_devices_vary_it(reference):
    assert reference.accuracy_tuned > reference.accuracy_base  # the noisy room is learned
    assert reference.seconds > 0 and reference.samples > 0
    assert set(reference.arrays) == {"A1", "A2", "A3", "B1", "B2", "B3"}
    one, two = perturbed(reference.arrays, 1), perturbed(reference.arrays, 2)
    assert not np.array_equal(one["A1"], two["A1"])
    assert np.array_equal(one["A1"], perturbed(reference.arrays, 1)["A1"])  # seeded
    gap = np.linalg.norm(one["A1"] - reference.arrays["A1"]) / np.linalg.norm(
        reference.arrays["A1"]
    )
    assert 0.0 < gap < 0.2


def test_devices_are_split_evenly_over_processes():
    assert split(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert split(2, 5) == [(0, 1), (1, 1)]


def test_installs_are_read_from_where_the_last_read_ended_and_a_torn_line_waits(tmp_path):
    fleet = SimulatedFleet("mqtt://x", tmp_path / "b.npz", [], 4, 2, tmp_path)
    log = InstallLog(tmp_path / "installs-1.jsonl")
    log("dev-2", 3, "apply_adapter")
    assert [(i.device, i.version) for i in fleet.installs()] == [("dev-2", 3)]
    with (tmp_path / "installs-1.jsonl").open("a") as torn:  # a write caught half-way
        torn.write('{"device": "dev-3", "version": 3, ')
    assert len(fleet.installs()) == 1
    with (tmp_path / "installs-1.jsonl").open("a") as rest:
        rest.write('"how": "desired_state", "at": 5.0}\n')
    InstallLog(tmp_path / "installs-0.jsonl")("dev-0", 3, "desired_state")
    assert sorted(i.device for i in fleet.installs()) == ["dev-0", "dev-2", "dev-3"]
    assert fleet.first_installs(3, since=0.0).keys() == {"dev-0", "dev-2", "dev-3"}


# -- jobs --------------------------------------------------------------------------------------
def test_a_short_finetune_sends_its_report_alone_as_its_end(reference):
    bench = Bench(reference)
    job = bench.job(JobKind.FINETUNE, finetune_params())
    assert bench.states(job.job_id) == []  # no IN_PROGRESS for a job done within 5 s
    assert bench.device.heartbeat().busy_job_id == job.job_id
    bench.timers.advance(SECONDS - 0.01)
    assert not bench.messages(Report)
    bench.timers.advance(0.02)
    (report,) = bench.messages(Report)
    assert report.job_id == job.job_id and report.metrics.epochs == 10
    assert report.metrics.accuracy_before == pytest.approx(reference.accuracy_base)
    assert report.metrics.accuracy_after == bench.evaluator.accuracy(report.adapter)
    assert report.metrics.finetune_seconds == SECONDS and report.metrics.rank == 4
    assert report.adapter["A1"].shape == (256, 4) and report.adapter["B3"].shape == (4, 3)
    assert bench.statuses(job.job_id) == []  # the report is its SUCCEEDED
    assert bench.device.runner.history[job.job_id] is JobState.SUCCEEDED
    assert bench.installs == [(None, "finetune")]
    beat = bench.device.heartbeat()
    assert beat.adapter_version is None and beat.busy_job_id is None and beat.cache_bytes > 0


def test_a_long_finetune_says_in_progress_5_s_after_it_arrived_then_every_5_s(reference):
    bench = Bench(reference, device_seconds=12.0)
    job = bench.job(JobKind.FINETUNE, finetune_params())
    bench.timers.advance(4.9)
    assert bench.states(job.job_id) == []
    bench.timers.advance(0.2)
    (started,) = bench.statuses(job.job_id)
    assert started.state is JobState.IN_PROGRESS
    bench.timers.advance(5.0)  # its progress, an interval later
    assert [s.progress for s in bench.statuses(job.job_id)][1] == pytest.approx(10 / 12)
    bench.timers.advance(2.0)
    assert bench.states(job.job_id) == [(JobState.IN_PROGRESS, None)] * 2  # then the report
    assert [r.job_id for r in bench.messages(Report)] == [job.job_id]


def test_a_job_that_ends_before_its_in_progress_is_due_leaves_no_timer_behind(reference):
    bench = Bench(reference)
    bench.job(JobKind.EVALUATE, EvaluateParams(None))  # answered in its handler
    assert bench.timers._due == []  # not even a cancelled one, left for the loop to skip
    bench.job(JobKind.FINETUNE, finetune_params())  # 2 s: over before anything else is due
    assert len(bench.timers._due) == 1  # its end
    bench.timers.advance(SECONDS)
    assert bench.timers._due == [] and len(bench.messages(Report)) == 1


def test_a_short_finetune_that_waited_says_in_progress_when_due_before_it_ends(reference):
    bench = Bench(reference, device_seconds=4.0)
    first = bench.job(JobKind.FINETUNE, finetune_params(1))
    second = bench.job(JobKind.FINETUNE, finetune_params(2))  # starts at 4 s, due at 5 s
    bench.timers.advance(4.9)
    assert bench.states(second.job_id) == []
    bench.timers.advance(0.2)
    assert bench.states(second.job_id) == [(JobState.IN_PROGRESS, None)]
    bench.timers.advance(3.0)
    assert [r.job_id for r in bench.messages(Report)] == [first.job_id, second.job_id]
    assert bench.states(first.job_id) == []


def test_every_message_carries_the_boot_id_and_the_next_seq(reference):
    bench = Bench(reference)
    bench.device.on_connected()  # presence and the first heartbeat
    bench.job(JobKind.FINETUNE, finetune_params())
    bench.timers.advance(SECONDS)
    envelopes = bench.envelopes()
    assert {e.boot_id for e in envelopes} == {"boot-1"}
    assert [e.seq for e in envelopes] == list(range(len(envelopes)))
    kinds = [type(e.message).__name__ for e in envelopes]
    assert kinds == ["Presence", "Heartbeat", "Report"]  # a fine-tune: its report, nothing else
    status_topic, _, qos, retain = bench.published[0]
    assert status_topic == f"fleet/{DEVICE}/status" and (qos, retain) == (1, True)
    assert bench.published[1][2:] == (0, False)  # telemetry: QoS 0, not retained
    assert isinstance(envelopes[0].message, Presence)
    assert envelopes[0].message.state is PresenceState.ONLINE


def test_arrivals_are_checked_like_the_agent_does(reference):
    bench = Bench(reference, max_queued_jobs=1)
    first = bench.job(JobKind.FINETUNE, finetune_params())
    bench.job(JobKind.FINETUNE, finetune_params(), job_id=first.job_id)
    assert bench.states(first.job_id)[-1] == (JobState.REJECTED, JobReason.DUPLICATE)
    assert bench.statuses(first.job_id)[-1].detail == {"previous_state": "in_progress"}
    expired = bench.job(JobKind.EVALUATE, EvaluateParams(), expires_in=-1)
    assert bench.states(expired.job_id) == [(JobState.REJECTED, JobReason.EXPIRED)]
    foreign = Job("j-foreign", JobKind.EVALUATE, EvaluateParams(), time.time() + 60, "f" * 64)
    bench.deliver("cmd/job", foreign)
    assert bench.states("j-foreign") == [(JobState.REJECTED, JobReason.BASE_MODEL_MISMATCH)]
    queued = bench.job(JobKind.EVALUATE, EvaluateParams())
    over = bench.job(JobKind.EVALUATE, EvaluateParams())
    assert bench.states(queued.job_id) == [] and bench.states(over.job_id) == [
        (JobState.REJECTED, JobReason.BUSY)
    ]
    bench.timers.advance(SECONDS)  # the fine-tune ends, the queued evaluation runs
    assert bench.states(queued.job_id)[-1] == (JobState.SUCCEEDED, None)


def test_cancel_stops_the_running_job_removes_a_queued_one_and_refuses_the_unknown(reference):
    bench = Bench(reference)
    running = bench.job(JobKind.FINETUNE, finetune_params())
    queued = bench.job(JobKind.FINETUNE, finetune_params(2))
    cancel_queued = bench.job(JobKind.CANCEL, CancelParams(queued.job_id))
    assert bench.states(queued.job_id) == [(JobState.REJECTED, JobReason.CANCELED)]
    assert bench.statuses(cancel_queued.job_id)[0].detail["result"] == "removed_from_queue"
    cancel_running = bench.job(JobKind.CANCEL, CancelParams(running.job_id))
    assert bench.statuses(cancel_running.job_id)[0].detail["result"] == "cancelling_running"
    bench.timers.advance(0)  # the device notices on its next turn, after answering the cancel
    assert bench.states(running.job_id)[-1] == (JobState.FAILED, JobReason.CANCELED)
    bench.timers.advance(SECONDS)
    assert not bench.messages(Report)  # the cancelled fine-tune never reports
    unknown = bench.job(JobKind.CANCEL, CancelParams("nope"))
    assert bench.states(unknown.job_id) == [(JobState.REJECTED, JobReason.NOTHING_TO_CANCEL)]


def test_an_undecodable_command_is_dropped_or_rejected_by_its_readable_id(reference):
    bench = Bench(reference)
    bench.device.on_message(f"fleet/{DEVICE}/cmd/job", b"\x93garbage")
    assert bench.device.dropped == 1 and not bench.published
    bench.device.on_message("fleet/other-device/cmd/job", b"")
    assert bench.device.dropped == 2


# -- adapters ----------------------------------------------------------------------------------
def test_a_chunked_adapter_is_reassembled_and_applied_without_a_fetch(reference):
    bench = Bench(reference)
    publication = bench.publication(3, perturbed(reference.arrays, 5))
    chunks = encode_for_publish(publication, sender="coordinator", limit=4096)
    assert len(chunks) > 1
    for item in reversed(chunks):  # any order, as QoS 1 may deliver them
        bench.device.on_message(f"fleet/{DEVICE}/cmd/adapter", item.payload)
    job = bench.job(JobKind.APPLY_ADAPTER, ApplyAdapterParams(3))
    (done,) = [s for s in bench.statuses(job.job_id) if s.state is JobState.SUCCEEDED]
    assert done.detail["accuracy"] == bench.evaluator.accuracy(publication.arrays)
    assert not bench.messages(FetchRequest)
    assert bench.installs == [(3, "apply_adapter")]
    assert bench.device.heartbeat().adapter_version == 3
    again = bench.job(JobKind.APPLY_ADAPTER, ApplyAdapterParams(3))
    assert bench.statuses(again.job_id)[-1].detail["already_running"] is True


def test_apply_fetches_a_missing_version_and_fails_if_it_never_comes(reference):
    bench = Bench(reference, fetch_timeout_s=10.0)
    job = bench.job(JobKind.APPLY_ADAPTER, ApplyAdapterParams(4))
    assert bench.messages(FetchRequest) == [FetchRequest(4)]
    bench.timers.advance(10.0)
    assert bench.states(job.job_id)[-1] == (JobState.FAILED, JobReason.ADAPTER_UNAVAILABLE)
    second = bench.job(JobKind.APPLY_ADAPTER, ApplyAdapterParams(4))
    bench.deliver("cmd/adapter", bench.publication(4))
    assert bench.states(second.job_id)[-1] == (JobState.SUCCEEDED, None)


def test_the_canary_evaluations_measure_the_candidate_and_the_base_model(reference):
    bench = Bench(reference)
    candidate = bench.publication(1, perturbed(reference.arrays, 9))
    bench.deliver("cmd/adapter", candidate)
    on_candidate = bench.job(JobKind.EVALUATE, EvaluateParams(1))
    on_base = bench.job(JobKind.EVALUATE, EvaluateParams(BASE_MODEL_VERSION))
    detail = bench.statuses(on_candidate.job_id)[-1].detail
    assert detail["accuracy"] == bench.evaluator.accuracy(candidate.arrays)
    assert bench.statuses(on_base.job_id)[-1].detail["accuracy"] == reference.accuracy_base
    assert bench.installs == []  # evaluating never installs


def test_the_desired_pointer_is_fetched_and_installed_between_jobs(reference):
    bench = Bench(reference, desired_retry_s=5.0)
    running = bench.job(JobKind.FINETUNE, finetune_params())
    desired = DesiredState(2, reference.base_model_hash, "default")
    bench.deliver("cmd/desired", desired)
    bench.deliver("cmd/desired", desired)  # re-delivered while fetching: ignored
    assert bench.messages(FetchRequest) == [FetchRequest(2)]
    bench.deliver("cmd/adapter", bench.publication(2))
    assert bench.installs == []  # a fine-tune runs: the install waits for it
    bench.timers.advance(SECONDS)
    assert [r.job_id for r in bench.messages(Report)] == [running.job_id]
    assert bench.installs == [(None, "finetune"), (2, "desired_state")]
    assert bench.device.heartbeat().adapter_version == 2
    bench.deliver("cmd/desired", DesiredState(2, "f" * 64, "default"))  # another base model
    assert bench.installs[-1] == (2, "desired_state") and len(bench.messages(FetchRequest)) == 1


def test_a_pointer_offering_its_inline_adapter_is_one_apply_job_answered_once(reference):
    bench = Bench(reference)
    publication = bench.publication(5, perturbed(reference.arrays, 3))
    offer = DesiredState(5, reference.base_model_hash, "default", adapter=publication,
                         job_id="apply-5", expires_at=time.time() + 60)  # fmt: skip
    bench.deliver("cmd/desired", offer)
    (answer,) = bench.messages(JobStatus)  # one status back, no IN_PROGRESS, no fetch
    assert (answer.job_id, answer.state) == ("apply-5", JobState.SUCCEEDED)
    assert answer.detail["accuracy"] == bench.evaluator.accuracy(publication.arrays)
    assert not bench.messages(FetchRequest) and bench.installs == [(5, "apply_adapter")]
    bench.deliver("cmd/desired", offer)  # the retained copy at a reconnect: not answered again
    assert len(bench.messages(JobStatus)) == 1 and len(bench.installs) == 1
    lapsed = DesiredState(6, reference.base_model_hash, "default", job_id="apply-6",
                          expires_at=time.time() - 1)  # fmt: skip
    bench.deliver("cmd/desired", lapsed)  # an expired offer: reconciled, unanswered
    assert bench.messages(FetchRequest) == [FetchRequest(6)]
    assert len(bench.messages(JobStatus)) == 1


def test_the_desired_pointer_asks_again_with_backoff_then_gives_up(reference):
    bench = Bench(reference, desired_retry_s=4.0, desired_max_fetches=3)
    bench.deliver("cmd/desired", DesiredState(6, reference.base_model_hash, "default"))
    bench.timers.advance(4.0 + 8.0 + 16.0)  # each wait at most retry × 2^k
    assert bench.messages(FetchRequest) == [FetchRequest(6)] * 3
    bench.timers.advance(600.0)
    assert len(bench.messages(FetchRequest)) == 3 and bench.installs == []


# -- what a generator process shares between its devices ----------------------------------------
def test_reports_carry_one_of_the_process_variants_with_its_real_accuracy(reference):
    evaluator = Evaluator(reference.learner)
    reports = []
    for index in range(12):
        device = SimulatedDevice(
            f"sim-{index:05d}", index, reference, evaluator, DeviceSettings(device_seconds=1.0),
            timers := ManualTimers(), lambda *publish: reports.append(decode(publish[1])),
            boot_id="boot-1",
        )  # fmt: skip
        job = Job(uuid.uuid4().hex, JobKind.FINETUNE, finetune_params(seed=3), time.time() + 60,
                  reference.base_model_hash)  # fmt: skip
        device.on_message(f"fleet/{device.device_id}/cmd/job", encode(job, sender="coordinator"))
        timers.advance(1.0)
    adapters = [e.message for e in reports if isinstance(e.message, Report)]
    assert len(adapters) == 12
    distinct = {m.adapter["A1"].tobytes() for m in adapters}
    assert 1 < len(distinct) <= REPORT_VARIANTS  # devices differ, from a bounded pool
    for report in adapters:  # every accuracy is the hold-out accuracy of the arrays sent
        assert report.metrics.accuracy_after == evaluator.accuracy(report.adapter)
        gap = np.linalg.norm(report.adapter["A1"] - reference.arrays["A1"])
        assert 0.0 < gap / np.linalg.norm(reference.arrays["A1"]) < 0.2


def test_heartbeats_carry_the_agents_fields_at_a_random_phase(reference):
    bench = Bench(reference, heartbeat_seconds=30.0)
    bench.device.on_connected()  # the first beat at once, then every 30 s from a random phase
    bench.timers.advance(100.0)
    beats = bench.messages(Heartbeat)
    uptimes = [beat.uptime_s for beat in beats]
    assert uptimes[0] == 0.0 and 0.0 <= uptimes[1] < 30.0
    assert np.allclose(np.diff(uptimes[1:]), 30.0) and len(beats) in (4, 5)
    last = beats[-1]
    assert last.power_source == "model:rpi-zero-2w" and last.drifted is False
    assert last.power_w == pytest.approx(0.6)  # the profile's idle watts
    assert last.drift_score == pytest.approx(reference.drift_score)
    assert last.spool_depth == 0 and last.adapter_version is None


def test_the_hosts_temperature_is_read_at_most_once_every_few_seconds(tmp_path):
    zone = tmp_path / THERMAL_ZONE
    zone.parent.mkdir(parents=True)
    zone.write_text("45000\n")
    timers = ManualTimers()
    temperature = HostTemperature(timers, every_s=5.0, root=tmp_path)
    assert temperature() == 45.0
    zone.write_text("51500\n")
    timers.advance(4.9)
    assert temperature() == 45.0  # the last read stands
    timers.advance(0.1)
    assert temperature() == 51.5
    assert HostTemperature(timers, root=tmp_path / "no-thermal-zone")() is None


# -- the benchmark's measuring ------------------------------------------------------------------
def test_prometheus_text_is_read_by_name_and_label():
    samples = parse_prometheus(
        "# TYPE skipfleet_received_messages_total counter\n"
        'skipfleet_received_messages_total{kind="job"} 3.0\n'
        'skipfleet_received_messages_total{kind="report"} 2.0\n'
        'skipfleet_aggregation_duration_seconds_sum{algorithm="exact-delta"} 0.5\n'
    )
    assert total(samples, "skipfleet_received_messages_total") == 5.0
    assert by_label(samples, "skipfleet_received_messages_total", "kind") == {
        "job": 3.0,
        "report": 2.0,
    }
    assert total(samples, "skipfleet_aggregation_duration_seconds_sum", algorithm="exact-delta")


def test_a_process_that_ends_inside_the_cpu_window_still_counts():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    child = subprocess.Popen([sys.executable, "-c", burn])
    with CpuWindow({"child": lambda: [child.pid]}, interval_s=0.05) as window:
        child.wait()
        assert window.seconds()["child"] > 0.3
    assert memory_of([os.getpid()]).rss_bytes > 0


def test_cpu_by_role_counts_each_process_of_the_tree_under_its_role():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    actor = subprocess.Popen(["ray::FleetActor.ingest", "-c", burn], executable=sys.executable)
    idle = subprocess.Popen(["sleep", "30"])
    tree = [os.getpid(), actor.pid, idle.pid]
    try:
        _wait_for_role(actor, "fleet actor")
        with _role_window(tree) as window:
            actor.wait()
            whole = window.seconds()["tree"]
            used = window.seconds_by_label("tree")
        assert set(used) == {"driver", "fleet actor", "other"}
        assert used["fleet actor"] > 0.3  # its burn, not the driver's
        assert used["driver"] < used["fleet actor"] and used["other"] < 0.1  # the sleep
        assert sum(used.values()) == pytest.approx(whole)  # the same samples, split
    finally:
        for child in (actor, idle):
            child.kill()
            child.wait()


def test_a_process_keeps_its_first_role_in_a_cpu_window():
    """An exiting process's command line reads empty (role_of: `other`): named again, it would
    move to `other`; named once, its CPU stays with its role, and only the window's counts."""
    burn_then_exit = (
        "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"
        "time.sleep(0.6)"
    )
    actor = subprocess.Popen(["ray::FleetActor.tick", "-c", burn_then_exit],
                             executable=sys.executable)  # fmt: skip
    try:
        _wait_for_role(actor, "fleet actor")
        deadline = time.monotonic() + 10
        while sum(cpu_by_process([actor.pid]).values()) < 0.45 and time.monotonic() < deadline:
            time.sleep(0.02)  # its burn is done before the window opens
        with _role_window([os.getpid(), actor.pid]) as window:
            time.sleep(1.2)  # it exits in the window, unreaped: a zombie with no command line
            assert role_of(actor.pid, os.getpid()) == "other"
            window.seconds()
            used = window.seconds_by_label("tree")
        assert "other" not in used
        assert used["fleet actor"] < 0.2  # its exit, and what was left of its burn
    finally:
        actor.kill()
        actor.wait()


def _role_window(tree: list[int]) -> CpuWindow:
    label = functools.partial(role_of, root=os.getpid())
    return CpuWindow({"tree": lambda: tree}, interval_s=0.05, labels={"tree": label})


def _wait_for_role(child: subprocess.Popen, role: str) -> None:
    deadline = time.monotonic() + 10  # until it has exec'd (a fork is `other`)
    while role_of(child.pid, os.getpid()) != role and time.monotonic() < deadline:
        time.sleep(0.01)
    assert role_of(child.pid, os.getpid()) == role


def test_memory_by_role_names_the_driver_rays_programs_and_its_workers():
    """Ray's binaries by their own name (the raylet's arguments name every other program),
    Ray's Python processes by their titles or scripts, the rest as `other`."""
    children = [
        subprocess.Popen(  # sh's $0 is `raylet`; its last argument names a worker script
            ["raylet", "-c", "sleep 30; :", "--python_worker_command=default_worker.py"],
            executable="/bin/sh",
            start_new_session=True,  # its sleep is stopped with it (killpg below)
        ),
        subprocess.Popen(["ray::FleetActor.tick", "30"], executable="/bin/sleep"),
        subprocess.Popen(["ray::PartitionActor.ingest", "30"], executable="/bin/sleep"),
        subprocess.Popen(["ray::IDLE", "30"], executable="/bin/sleep"),
        subprocess.Popen(["sleep", "30"]),
    ]
    try:
        expected = ["raylet", "fleet actor", "partition actor", "ray worker", "other"]
        deadline = time.monotonic() + 10  # until each child has exec'd (a fork is `other`)
        while _roles(children) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _roles(children) == expected
        by_role = memory_by_role(os.getpid())
        assert by_role["driver"].processes == 1 and by_role["driver"].pss_bytes > 0
        # at least: a Ray session fixture of this test process adds its own
        assert by_role["ray worker"].processes >= 1 and by_role["raylet"].processes >= 1
    finally:
        os.killpg(children[0].pid, signal.SIGKILL)
        for child in children:
            child.kill()
            child.wait()


def _roles(children: list[subprocess.Popen]) -> list[str]:
    return [role_of(c.pid, os.getpid()) for c in children]


# -- against the real coordinator ------------------------------------------------------------
def coordinator_config(broker_url: str, state_dir: Path) -> CoordinatorConfig:
    policy = SchedulerPolicy(
        max_concurrent_jobs=5, accuracy_threshold=None, accuracy_drop_margin=None,
        drift_threshold=None, heartbeat_timeout_s=10.0, job_timeout_s=30.0,
        round_deadline_s=60.0,
    )  # fmt: skip
    return CoordinatorConfig(
        mqtt=parse_broker_url(broker_url, session_expiry_s=600, reconnect_max_delay_s=2),
        state_dir=state_dir,
        actor_name=f"loadgen-{uuid.uuid4().hex[:8]}",  # one actor per test on the shared Ray
        metrics_addr="127.0.0.1", metrics_port=0, api_addr="127.0.0.1", api_port=0,
        policy=policy,
        rollout=RolloutPolicy(canary_fraction=0.4, canary_deadline_s=60.0),
        finetune=FinetuneSettings(epochs=10, lr=0.02),
        federation=FederationPolicy(max_rounds=1),  # the load generator's devices: one round
        command_timeout_s=30.0, tick_interval_s=0.2, metrics_interval_s=0.5,
    )  # fmt: skip


def wait(check, timeout: float = 45.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def said_offline(envelope, retained: bool, device: str) -> bool:
    message = envelope.message
    return (
        retained
        and envelope.sender == device
        and isinstance(message, Presence)
        and message.state is PresenceState.OFFLINE
    )


@pytest.mark.slow
def test_a_round_reaches_every_simulated_device(ray_session, mosquitto, world, tmp_path):
    coordinator = Coordinator.start(coordinator_config(mosquitto.url, tmp_path / "coordinator"))
    api = ApiClient(
        f"http://127.0.0.1:{coordinator.api.port}", token_file=coordinator.config.token_path
    )
    fleet = SimulatedFleet(
        mosquitto.url, world / "base.npz", [world / "device.npz"], 5, 2, tmp_path / "loadgen",
        options=["--heartbeat-seconds", "1", "--device-seconds", "0.5", "--epochs", "10"],
    )  # fmt: skip
    try:
        fleet.start(60)
        assert len(fleet.device_ids) == 5
        wait(lambda: sum(d["online"] and bool(d["cohort"]) for d in api.get("/devices")) == 5)
        started = time.time()
        (opened,) = api.post("/finetune", {"all": True})["rounds"]
        assert sorted(opened["devices"]) == fleet.device_ids
        cohort = wait(lambda: next((c for c in api.get("/adapters")
                                    if c["current_version"] is not None), None))  # fmt: skip
        version = cohort["current_version"]
        installs = wait(lambda: len(seen := fleet.first_installs(version, started)) == 5 and seen)
        assert all(at > started for at in installs.values())
        wait(lambda: all(d["adapter_version"] == version for d in api.get("/devices")))
        (record,) = api.get("/rounds")
        assert record["stage"] == "STORED" and sorted(record["answered"]) == fleet.device_ids
        assert {j["state"] for j in api.get("/jobs?limit=1000")} == {"SUCCEEDED"}
        fleet.stop()
        probe = FleetProbe(parse_broker_url(mosquitto.url), "loadgen-probe")
        try:  # a clean stop leaves every device's retained presence at offline
            for device in fleet.device_ids:
                probe.wait_for(lambda t, e, r, d=device: said_offline(e, r, d), 10)
        finally:
            probe.close()
    finally:
        fleet.stop()
        coordinator.stop()


@pytest.mark.slow
def test_bench_coordinator_runs_end_to_end_on_three_devices(ray_session, data_dir, tmp_path):
    from skipfleet.cli import main

    out = tmp_path / "bench.json"
    code = main([
        "bench", "coordinator", "--data-dir", str(data_dir), "--devices", "3", "--rounds", "1",
        "--aggregation-sizes", "10", "--heartbeat-seconds", "2", "--round-timeout", "60",
        "--ray-address", ray_session.get_runtime_context().gcs_address,
        "--work-dir", str(tmp_path / "work"), "--json", str(out),
    ])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0, result["fleets"]["3"]["failure"]
    fleet = result["fleets"]["3"]
    (measured,) = fleet["rounds"]
    assert 0 < measured["latency_seconds"] <= measured["coordinator_view_seconds"]
    assert measured["messages"]["received"]["count"] > 0 and measured["answered"] == 3
    timed = {"coordinate-median", "exact-delta", "naive-fedavg"}  # the default, and the compared
    assert set(measured["aggregation_seconds"]) == timed
    assert fleet["memory_idle"]["driver_rss_bytes"] > 0
    assert set(result["aggregation_micro"]["sizes"]) == {"10"}
    assert Path(tmp_path / "work" / "3" / "coordinator.log").exists()


def round_messages(probe: FleetProbe, since: float) -> dict[str, Counter]:
    """Per device: how many messages of each topic kind crossed the broker since `since`, live
    (not retained copies), presence and telemetry left out (they are not the round's)."""
    counts: dict[str, Counter] = {}
    for item in list(probe.received):
        device, kind = probe.topics.parse(item.topic)
        if item.retained or item.arrival < since:
            continue
        if kind not in (TopicKind.STATUS, TopicKind.TELEMETRY):
            counts.setdefault(device, Counter())[kind] += 1
    return counts


@pytest.mark.slow
def test_one_round_costs_a_device_two_messages_each_way(ray_session, mosquitto, world, tmp_path):
    """Trigger -> promoted adapter running: a fine-tune job and its report (its SUCCEEDED), the
    retained pointer with the adapter inline and the offer, and the offer's one status. A canary
    device has its two evaluations besides (two jobs, two statuses) and the candidate adapter.
    Before: 5 in and 4 out for every device (IN_PROGRESS and SUCCEEDED per job, and the adapter,
    the apply job and the pointer as three messages)."""
    coordinator = Coordinator.start(coordinator_config(mosquitto.url, tmp_path / "coordinator"))
    api = ApiClient(
        f"http://127.0.0.1:{coordinator.api.port}", token_file=coordinator.config.token_path
    )
    fleet = SimulatedFleet(
        mosquitto.url, world / "base.npz", [world / "device.npz"], 5, 1, tmp_path / "loadgen",
        options=["--heartbeat-seconds", "1", "--device-seconds", "0.5", "--epochs", "10"],
    )  # fmt: skip
    probe = FleetProbe(parse_broker_url(mosquitto.url), "round-counter")
    try:
        assert probe.subscribed.wait(10)
        fleet.start(60)
        wait(lambda: sum(d["online"] and bool(d["cohort"]) for d in api.get("/devices")) == 5)
        since = time.monotonic()
        api.post("/finetune", {"all": True})
        cohort = wait(lambda: next((c for c in api.get("/adapters")
                                    if c["current_version"] is not None), None))  # fmt: skip
        version = cohort["current_version"]
        wait(lambda: all(d["adapter_version"] == version for d in api.get("/devices")))
        wait(lambda: all(j["state"] == "SUCCEEDED" for j in api.get("/jobs?limit=1000")))
        time.sleep(1.0)  # anything late would be counted too
        counts = round_messages(probe, since)
        assert sorted(counts) == fleet.device_ids
        canaries = {d for d, c in counts.items() if c[TopicKind.CMD_ADAPTER]}
        assert len(canaries) == 2  # canary fraction 0.4 of 5
        for device, seen in counts.items():
            extra = 2 if device in canaries else 0  # two evaluations: two jobs, two statuses
            assert seen == Counter({
                TopicKind.CMD_JOB: 1 + extra, TopicKind.CMD_DESIRED: 1,
                TopicKind.CMD_ADAPTER: 1 if extra else 0,
                TopicKind.REPORT: 1, TopicKind.JOB: 1 + extra,
            }), device  # fmt: skip
        per_device = sum(sum(c.values()) for c in counts.values()) / len(counts)
        assert per_device == pytest.approx(4 + 2 * 5 / 5)  # 4 each, 5 more per canary
        statuses = [e.message for _, e, _ in probe.messages(JobStatus)]
        assert not [s for s in statuses if s.state is JobState.IN_PROGRESS]
    finally:
        probe.close()
        fleet.stop()
        coordinator.stop()
