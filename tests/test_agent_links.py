"""Uplink (stamping, chunking, spooling) and downlink (decoding, rejecting, reassembling)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest

from agent.adapter_inbox import AdapterInbox
from agent.downlink import JOB_MAX_BYTES, Downlink
from agent.job_history import JobHistory
from agent.jobs import CancelResult, JobOutcome, JobRunner
from agent.spool import Priority, Spool
from agent.uplink import Uplink
from shared.protocol import decode, encode, encode_for_publish
from shared.protocol.enums import JobKind, JobReason, JobState
from shared.protocol.messages import (
    AdapterPublication,
    CancelParams,
    DesiredState,
    EvaluateParams,
    FetchRequest,
    Heartbeat,
    Job,
    JobStatus,
    Lineage,
)
from shared.topics import Topics

TOPICS = Topics()


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "s.sqlite", max_messages=1000)
    yield s
    s.close()


def heartbeat():
    return Heartbeat(
        power_w=1.0,
        power_source="model:generic",
        energy_j_total=2.0,
        cache_bytes=0,
        spool_depth=0,
        spool_dropped=0,
        uptime_s=1.0,
    )


def test_uplink_stamps_boot_and_increasing_seq_and_routes_by_kind(spool):
    notified = []
    uplink = Uplink("dev-1", TOPICS, spool, boot_id="b1", on_spooled=lambda: notified.append(1))
    uplink.send(JobStatus("j1", JobState.IN_PROGRESS))
    uplink.send(heartbeat())
    uplink.send(FetchRequest(3))
    items = spool.pending(10)
    assert [i.topic for i in items] == [
        "fleet/dev-1/job",
        "fleet/dev-1/telemetry",
        "fleet/dev-1/fetch",
    ]
    assert [i.priority for i in items] == [Priority.RECORD, Priority.TELEMETRY, Priority.RECORD]
    assert [i.qos for i in items] == [1, 0, 1]
    envelopes = [decode(i.payload) for i in items]
    assert [e.dedup_key for e in envelopes] == [
        ("dev-1", "b1", 0),
        ("dev-1", "b1", 1),
        ("dev-1", "b1", 2),
    ]
    assert len(notified) == 3


def test_uplink_chunks_a_large_message_under_the_limit(spool):
    uplink = Uplink("dev-1", TOPICS, spool, boot_id="b1", chunk_limit=4096)
    status = JobStatus("j1", JobState.SUCCEEDED, detail={f"k{i}": "x" * 900 for i in range(8)})
    uplink.send(status)
    items = spool.pending(100)
    assert len(items) > 1 and all(len(i.payload) <= 4096 for i in items)
    assert {i.topic for i in items} == {"fleet/dev-1/job"}


@dataclass
class Receiver:
    link: Downlink
    runner: JobRunner
    inbox: AdapterInbox
    statuses: list[JobStatus]

    def handle(self, topic, payload):
        self.link.handle(topic, payload)


@pytest.fixture
def downlink(tmp_path):
    statuses: list[JobStatus] = []
    runner = JobRunner(
        {JobKind.EVALUATE: lambda job, ctx: JobOutcome()},
        statuses.append,
        JobHistory(tmp_path / "jobs.json"),
        base_model_hash="h",
    )
    inbox = AdapterInbox()
    return Receiver(Downlink("dev-1", TOPICS, runner=runner, inbox=inbox), runner, inbox, statuses)


def job_bytes(job_id="j1", **body_overrides):
    job = Job(job_id, JobKind.EVALUATE, EvaluateParams(), expires_at=time.time() + 60)
    envelope = msgpack.unpackb(encode(job, sender="coordinator"))
    envelope["body"].update(body_overrides)
    return msgpack.packb(envelope, use_bin_type=True)


def test_a_valid_job_is_queued_without_a_status(downlink):
    downlink.handle("fleet/dev-1/cmd/job", job_bytes())
    assert downlink.statuses == []
    assert downlink.runner.cancel("j1") is CancelResult.REMOVED_FROM_QUEUE


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (job_bytes(expires_at="tomorrow"), JobReason.MALFORMED),
        (job_bytes(kind="reboot"), JobReason.UNKNOWN_KIND),
        (job_bytes(params={"adapter_version": -1}), JobReason.INVALID_PARAMS),
        (job_bytes(padding=b"x" * (JOB_MAX_BYTES + 1)), JobReason.MALFORMED),
        (job_bytes(expires_at=time.time() - 5), JobReason.EXPIRED),
    ],
    ids=["malformed", "unknown-kind", "invalid-params", "oversized", "expired"],
)
def test_unacceptable_jobs_are_rejected_with_a_reason(downlink, payload, reason):
    downlink.handle("fleet/dev-1/cmd/job", payload)
    (status,) = downlink.statuses
    assert (status.job_id, status.state, status.reason_code) == ("j1", JobState.REJECTED, reason)
    assert status.reason


def test_garbage_without_a_job_id_is_dropped_and_counted(downlink):
    downlink.handle("fleet/dev-1/cmd/job", b"\xc1 not msgpack")
    downlink.handle("fleet/dev-2/cmd/job", job_bytes())  # not this device's topic
    assert downlink.statuses == [] and downlink.link.dropped == 2


def test_a_chunked_adapter_is_reassembled_into_the_inbox(downlink):
    arrays = {"delta1": np.random.default_rng(0).normal(size=(256, 3)).astype(np.float32)}
    publication = AdapterPublication(
        4, "h", "default", arrays, Lineage("r", ("dev-1",), "avg"), created_at=1.0
    )
    chunks = encode_for_publish(publication, sender="coordinator", limit=1024)
    assert len(chunks) > 1
    for chunk in reversed(chunks):  # any order
        downlink.handle("fleet/dev-1/cmd/adapter", chunk.payload)
    received = downlink.inbox.get(4)
    np.testing.assert_array_equal(received.arrays["delta1"], arrays["delta1"])


def test_a_desired_pointer_is_handed_to_the_reconciler(tmp_path):
    offered: list[DesiredState] = []
    runner = JobRunner({}, lambda s: None, JobHistory(tmp_path / "j.json"), base_model_hash="h")
    link = Downlink("dev-1", TOPICS, runner=runner, inbox=AdapterInbox(), on_desired=offered.append)
    desired = DesiredState(adapter_version=3, base_model_hash="h", cohort="default")
    link.handle("fleet/dev-1/cmd/desired", encode(desired, sender="coordinator"))
    link.handle("fleet/dev-1/cmd/job", encode(desired, sender="coordinator"))  # wrong topic
    assert offered == [desired] and link.dropped == 1


def test_a_cancel_job_on_the_wire_is_carried_out_on_arrival(downlink):
    downlink.handle("fleet/dev-1/cmd/job", job_bytes("queued-1"))
    cancel = Job("c-1", JobKind.CANCEL, CancelParams("queued-1"), expires_at=time.time() + 60)
    downlink.handle("fleet/dev-1/cmd/job", encode(cancel, sender="coordinator"))
    assert [(s.job_id, s.state, s.reason_code) for s in downlink.statuses] == [
        ("queued-1", JobState.REJECTED, JobReason.CANCELED),
        ("c-1", JobState.SUCCEEDED, None),
    ]
