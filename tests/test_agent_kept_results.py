"""A finished job's result, kept after the broker's PUBACK (agent.kept_results) and sent again,
unchanged, when the coordinator asks for the job again (agent.repeats): kept if and only if
spooled, bounded in time, jobs and bytes, and still there after the agent restarts."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from agent.adapter_inbox import AdapterInbox
from agent.downlink import Downlink
from agent.job_history import JobHistory
from agent.jobs import JobOutcome, JobRunner
from agent.kept_results import KEEP_MARGIN_SECONDS, KeptResults, result_job_id
from agent.repeats import RepeatedJobs
from agent.spool import Spool, SpoolFull
from agent.uplink import Uplink
from shared.protocol import decode, encode
from shared.protocol.enums import JobKind, JobReason, JobState
from shared.protocol.messages import (
    DesiredState,
    FinetuneParams,
    Heartbeat,
    Job,
    JobStatus,
    Report,
    ReportMetrics,
)
from shared.topics import TopicKind, Topics

NOW = 1_700_000_000.0
DEVICE = "dev-1"
TOPICS = Topics()


class Device:
    """The agent's spool, history, kept results and uplink over one state dir."""

    def __init__(self, tmp_path, *, max_jobs=64, max_bytes=32 * 1024 * 1024, spool_rows=1000):
        self.clock = [NOW]
        self.spool = Spool(tmp_path / "spool.sqlite", max_messages=spool_rows)
        self.history = JobHistory(tmp_path / "jobs.json", clock=lambda: self.clock[0])
        self.kept = KeptResults(self.spool, self.history.expiry_of, max_jobs=max_jobs,
                                max_bytes=max_bytes, clock=lambda: self.clock[0])  # fmt: skip
        self.uplink = Uplink(DEVICE, TOPICS, self.spool, boot_id="boot-one", keeper=self.kept)

    def finish(self, job_id: str, expires_at: float = NOW + 600) -> None:
        """What a fine-tune leaves: accepted, its report, its SUCCEEDED status."""
        self.history.record(job_id, expires_at, JobState.IN_PROGRESS)
        self.uplink.send(report(job_id))
        self.history.record(job_id, expires_at, JobState.SUCCEEDED)
        self.uplink.send(JobStatus(job_id, JobState.SUCCEEDED, progress=1.0))

    def spooled(self) -> list[tuple[str, bytes]]:
        return [(item.topic, item.payload) for item in self.spool.pending(10_000)]

    def deliver_all(self) -> list[tuple[str, bytes]]:
        """The broker's PUBACK for everything spooled: the rows leave the spool."""
        items = self.spool.pending(10_000)
        for item in items:
            self.spool.ack(item.id)
        return [(item.topic, item.payload) for item in items]


def report(job_id: str, size: int = 8) -> Report:
    metrics = ReportMetrics(accuracy_before=0.5, accuracy_after=0.9, samples=10, epochs=1,
                            finetune_seconds=1.0, joules=1.0, power_source="model:test",
                            cache_hit_rate=0.0, base_model_hash="h" * 64,
                            method="skip2-lora", rank=4)  # fmt: skip
    return Report(job_id, {"delta": np.arange(size, dtype=np.float32)}, metrics)


def finetune(job_id: str, expires_at: float = NOW + 600) -> Job:
    return Job(job_id, JobKind.FINETUNE, FinetuneParams(epochs=1, lr=0.1, seed=0), expires_at)


def stamps(payloads: list[tuple[str, bytes]]) -> list[tuple[str, int | None, str]]:
    """(boot id, seq, kind) of each publish: what the coordinator de-duplicates by."""
    out = []
    for _, payload in payloads:
        envelope = decode(payload)
        out.append((envelope.boot_id, envelope.seq, envelope.kind.value))
    return out


# ---- what is kept


def test_a_finished_jobs_report_and_status_are_kept_byte_for_byte_after_the_puback(tmp_path):
    device = Device(tmp_path)
    device.finish("job-1")
    delivered = device.deliver_all()
    assert device.spooled() == []  # the broker acknowledged them
    kept = device.kept.of("job-1")
    assert [(k.topic, k.payload) for k in kept] == delivered
    assert [k.qos for k in kept] == [1, 1]


def test_progress_statuses_telemetry_and_jobs_never_accepted_are_not_kept(tmp_path):
    device = Device(tmp_path)
    device.history.record("job-1", NOW + 600, JobState.IN_PROGRESS)
    device.uplink.send(JobStatus("job-1", JobState.IN_PROGRESS, progress=0.5))
    device.uplink.send(Heartbeat(power_w=1.0, power_source="model:test", energy_j_total=1.0,
                                 cache_bytes=0, spool_depth=0, spool_dropped=0,
                                 uptime_s=1.0))  # fmt: skip
    # a command that could not be decoded is rejected by id; the device never accepted it
    device.uplink.send(JobStatus("garbled", JobState.REJECTED, reason_code=JobReason.MALFORMED))
    assert len(device.spooled()) == 3
    assert device.kept.jobs() == []


def test_a_result_that_cannot_be_spooled_is_not_kept_either(tmp_path):
    device = Device(tmp_path, spool_rows=1)
    device.history.record("job-1", NOW + 600, JobState.IN_PROGRESS)
    device.uplink.send(report("job-1"))  # fills the spool
    with pytest.raises(SpoolFull):
        device.uplink.send(JobStatus("job-1", JobState.SUCCEEDED))
    assert [decode(k.payload).kind.value for k in device.kept.of("job-1")] == ["report"]


def test_kept_results_survive_an_agent_restart(tmp_path):
    device = Device(tmp_path)
    device.finish("job-1")
    before = device.kept.of("job-1")
    device.spool.close()
    again = Device(tmp_path)
    assert again.kept.of("job-1") == before and len(before) == 2


# ---- bounds


def test_a_result_is_kept_until_its_jobs_expiry_plus_the_margin(tmp_path):
    device = Device(tmp_path)
    device.finish("old", expires_at=NOW + 60)
    device.clock[0] = NOW + 60 + KEEP_MARGIN_SECONDS - 1
    device.finish("new", expires_at=NOW + 6000)
    assert device.kept.jobs() == ["old", "new"]
    device.clock[0] = NOW + 60 + KEEP_MARGIN_SECONDS + 1
    device.finish("newer", expires_at=NOW + 6000)  # keeping a result prunes the expired ones
    assert device.kept.jobs() == ["new", "newer"]


def test_past_the_job_bound_the_oldest_results_go_first(tmp_path):
    device = Device(tmp_path, max_jobs=3)
    for k in range(5):
        device.finish(f"job-{k}")
    assert device.kept.jobs() == ["job-2", "job-3", "job-4"]
    assert len(device.kept.of("job-4")) == 2  # whole results go, never half of one


def test_past_the_byte_bound_the_oldest_results_go_first(tmp_path):
    (tmp_path / "probe").mkdir()
    one = Device(tmp_path / "probe")
    one.finish("probe")
    size = sum(len(k.payload) for k in one.kept.of("probe"))
    device = Device(tmp_path, max_bytes=2 * size + size // 2)
    for k in range(4):
        device.finish(f"job-{k}")
    assert device.kept.jobs() == ["job-2", "job-3"]


# ---- a repeated job id: the coordinator asking again


def repeats(device: Device, emitted: list) -> RepeatedJobs:
    return RepeatedJobs(device.history, device.kept, device.uplink, emitted.append)


def test_a_finished_job_asked_again_sends_its_kept_result_unchanged(tmp_path):
    device = Device(tmp_path)
    device.finish("job-1")
    first = device.deliver_all()
    emitted: list = []
    assert repeats(device, emitted).answer(finetune("job-1"))
    again = device.deliver_all()
    assert again == first and stamps(again) == stamps(first)
    assert [s[2] for s in stamps(again)] == ["report", "job_status"]
    assert emitted == []


def test_a_running_job_asked_again_gets_its_status_a_queued_one_goes_to_the_runner(tmp_path):
    device = Device(tmp_path)
    emitted: list = []
    answers = repeats(device, emitted)
    device.history.record("running", NOW + 600, JobState.IN_PROGRESS)
    device.history.record("queued", NOW + 600, JobState.QUEUED)
    assert answers.answer(finetune("running"))
    assert [(s.job_id, s.state) for s in emitted] == [("running", JobState.IN_PROGRESS)]
    assert not answers.answer(finetune("queued"))  # the runner rejects it: DUPLICATE, QUEUED
    assert not answers.answer(finetune("new"))  # never seen: the runner takes it
    assert device.spooled() == []


def test_a_finished_job_whose_result_is_no_longer_kept_is_left_to_the_runner(tmp_path):
    device = Device(tmp_path, max_jobs=1)
    device.finish("job-1")
    device.finish("job-2")  # evicts job-1's result
    assert not repeats(device, []).answer(finetune("job-1"))


def test_through_the_downlink_a_repeat_is_answered_and_not_rejected_as_a_duplicate(tmp_path):
    """A real runner and downlink: the job runs once; asked again (the same command), the
    device answers with the kept report and status, and the runner never sees the repeat."""
    device = Device(tmp_path)
    statuses: queue.Queue = queue.Queue()

    def emit(status: JobStatus) -> None:
        device.uplink.send(status)
        statuses.put(status)

    def handler(job, ctx):
        device.uplink.send(report(job.job_id))
        return JobOutcome({"accuracy_after": 0.9})

    runner = JobRunner({JobKind.FINETUNE: handler}, emit, device.history,
                       base_model_hash="h" * 64, clock=lambda: device.clock[0])  # fmt: skip
    answers = RepeatedJobs(device.history, device.kept, device.uplink, emit)
    downlink = Downlink(DEVICE, TOPICS, runner=runner, inbox=AdapterInbox(), repeats=answers)
    command = encode(finetune("job-1"), sender="coordinator")
    topic = TOPICS.topic(DEVICE, TopicKind.CMD_JOB)
    runner.start()
    try:
        downlink.handle(topic, command)
        while statuses.get(timeout=10).state is not JobState.SUCCEEDED:
            pass
        first = device.deliver_all()
        downlink.handle(topic, command)  # the coordinator asks again
        again = device.deliver_all()
    finally:
        runner.stop()
    assert statuses.empty()  # no DUPLICATE rejection, no second run
    results = [p for p in first if result_job_id(decode(p[1]).message) == "job-1"]
    assert len(results) == 2 and again == results  # an IN_PROGRESS would not be part of it


def test_an_offer_sent_again_live_is_answered_with_its_kept_status_a_retained_copy_is_not(
    tmp_path,
):
    """A desired pointer's offer is an APPLY_ADAPTER job: the coordinator asks for it again by
    sending the pointer again (live); the broker's stored copy at every subscribe is not a
    question, and is left to the reconciler as before."""
    device = Device(tmp_path)
    pointer = DesiredState(3, "h" * 64, "fan", job_id="apply-1", expires_at=NOW + 600)
    device.history.record("apply-1", NOW + 600, JobState.SUCCEEDED)
    device.uplink.send(JobStatus("apply-1", JobState.SUCCEEDED, detail={"installed": True}))
    first = device.deliver_all()
    reconciled: list = []
    runner = JobRunner({}, lambda status: None, device.history, base_model_hash="h" * 64)
    answers = RepeatedJobs(device.history, device.kept, device.uplink, lambda status: None)
    downlink = Downlink(DEVICE, TOPICS, runner=runner, inbox=AdapterInbox(),
                        on_desired=reconciled.append, repeats=answers)  # fmt: skip
    topic = TOPICS.topic(DEVICE, TopicKind.CMD_DESIRED)
    payload = encode(pointer, sender="coordinator")
    downlink.handle(topic, payload, retained=True)
    assert device.spooled() == []
    downlink.handle(topic, payload, retained=False)
    assert device.deliver_all() == first
    assert reconciled == [pointer, pointer]  # the reconciler sees both, as before
