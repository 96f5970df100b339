"""Desired state against a real mosquitto: the retained pointer brings a device that was offline
to the current adapter, fetched on request and applied without a job (chunked when large)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.data.dataset import holdout_split
from agent.trainer.adapter import Adapter
from shared.protocol.enums import JobKind, JobState, PresenceState
from shared.protocol.messages import (
    AdapterPublication,
    DesiredState,
    EvaluateParams,
    FetchRequest,
    Job,
    JobStatus,
    Lineage,
    RollbackAdapterParams,
)
from shared.topics import TopicKind
from tests.agent_fixtures import fan_files  # noqa: F401 (a fixture)
from tests.agent_process import DEVICE, HOLDOUT_FRACTION, SEED, Observer, run_fleet

pytestmark = pytest.mark.slow

FAST = ("--heartbeat-seconds", "0.5", "--desired-retry-seconds", "5")


@pytest.fixture
def fleet(mosquitto, fan_files, tmp_path):  # noqa: F811
    yield from run_fleet(mosquitto, fan_files, tmp_path)


def publication(model, version: int, rank: int = 0, seed: int = 0) -> AdapterPublication:
    """Small deltas; with `rank`, LoRA factors too (rank 200: about 360 KB on the wire)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for k, d in enumerate(model.layer_input_dims, start=1):
        arrays[f"delta{k}"] = (rng.standard_normal((d, model.n_classes)) * 0.01).astype(np.float32)
        if rank:
            arrays[f"A{k}"] = (rng.standard_normal((d, rank)) * 0.01).astype(np.float32)
            arrays[f"B{k}"] = (rng.standard_normal((rank, model.n_classes)) * 0.01).astype(
                np.float32
            )
    lineage = Lineage(f"round-{version}", (DEVICE,), "fedavg-delta")
    return AdapterPublication(version, model.weights_hash, "default", arrays, lineage, time.time())


def fetch_request(observer: Observer, version: int, after: int = 0) -> FetchRequest:
    return observer.wait_for(
        lambda t, e, r: (
            t == f"fleet/{DEVICE}/fetch"
            and isinstance(e.message, FetchRequest)
            and e.message.adapter_version == version
        ),
        after=after,
    ).message


def job(job_id: str, kind: JobKind, params) -> Job:
    return Job(job_id, kind, params, expires_at=time.time() + 600)


def test_a_device_offline_when_the_pointer_moved_fetches_and_applies_it_at_start(
    fleet,
    fan_files,  # noqa: F811
):
    start_agent, observer, _ = fleet
    model = fan_files.model
    observer.send(
        TopicKind.CMD_DESIRED, DesiredState(5, model.weights_hash, "default"), retain=True
    )
    start_agent(*FAST)  # comes online after the pointer was published: the broker retained it
    assert observer.presence(PresenceState.ONLINE).base_model_hash == model.weights_hash
    fetch_request(observer, 5)
    observer.send(TopicKind.CMD_ADAPTER, publication(model, 5))
    assert observer.heartbeat(lambda beat: beat.adapter_version == 5).adapter_version == 5
    # The pointer moves to "base model alone": the adapter stops, and is kept for rollback.
    mark = observer.mark()
    observer.send(
        TopicKind.CMD_DESIRED, DesiredState(None, model.weights_hash, "default"), retain=True
    )
    observer.heartbeat(lambda beat: beat.adapter_version is None, after=mark)
    observer.send_job(job("rb-1", JobKind.ROLLBACK_ADAPTER, RollbackAdapterParams()))
    assert observer.status_of("rb-1", JobState.SUCCEEDED).detail["adapter_version"] == 5


def test_a_large_adapter_arrives_in_chunks_and_is_applied(fleet, fan_files):  # noqa: F811
    start_agent, observer, _ = fleet
    model = fan_files.model
    start_agent(*FAST)
    observer.presence(PresenceState.ONLINE)
    observer.send(
        TopicKind.CMD_DESIRED, DesiredState(6, model.weights_hash, "default"), retain=True
    )
    fetch_request(observer, 6)
    large = publication(model, 6, rank=200)
    assert observer.send(TopicKind.CMD_ADAPTER, large) > 1  # chunked under 128 KB each
    observer.heartbeat(lambda beat: beat.adapter_version == 6)
    observer.send_job(job("ev-6", JobKind.EVALUATE, EvaluateParams()))
    detail = observer.status_of("ev-6", JobState.SUCCEEDED).detail
    _, holdout = holdout_split(fan_files.device_data, HOLDOUT_FRACTION, seed=SEED)
    adapter = Adapter.from_arrays(dict(large.arrays), model.layer_input_dims, model.n_classes)
    assert detail["adapter_version"] == 6
    assert detail["accuracy"] == pytest.approx(model.accuracy(holdout.X, holdout.y, adapter))


def test_a_retained_offer_with_its_adapter_inline_is_applied_and_answered_once(
    fleet,
    fan_files,  # noqa: F811
):
    start_agent, observer, _ = fleet
    model = fan_files.model
    offer = DesiredState(7, model.weights_hash, "default", adapter=publication(model, 7),
                         job_id="apply-7", expires_at=time.time() + 600)  # fmt: skip
    observer.send(TopicKind.CMD_DESIRED, offer, retain=True)  # there before the device
    agent = start_agent(*FAST)
    answer = observer.status_of("apply-7", JobState.SUCCEEDED)
    assert answer.detail["installed"] is True and answer.detail["adapter_version"] == 7
    observer.heartbeat(lambda beat: beat.adapter_version == 7)
    agent.stop()
    mark = observer.mark()
    start_agent(*FAST)  # the retained offer again, at the next start: already answered
    observer.heartbeat(lambda beat: beat.adapter_version == 7, after=mark)
    observer.heartbeat(lambda beat: True, after=observer.mark())  # a beat later still nothing
    mine = [e.message for _, e, _ in observer.messages(JobStatus) if e.message.job_id == "apply-7"]
    assert [s.state for s in mine] == [JobState.SUCCEEDED]  # one status, no IN_PROGRESS
    assert observer.messages(FetchRequest) == []  # the adapter came with the pointer
