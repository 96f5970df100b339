"""Desired-state reconcile: fetch, install and keep for rollback the version the pointer names."""

from __future__ import annotations

import logging
import random
import threading
import time

import numpy as np
import pytest

from agent.adapter_inbox import AdapterInbox
from agent.adapter_store import AdapterSource, AdapterStore
from agent.job_history import JobHistory
from agent.jobs import JobRunner
from agent.local_data import load_local_data
from agent.reconcile import FetchPolicy, Reconciler
from shared.protocol.messages import AdapterPublication, DesiredState, FetchRequest, Lineage
from tests.agent_fixtures import (  # noqa: F401 (fixtures)
    fan_files,
    good_arrays,
    own_choice,
    unlabelled_files,
)

WAIT = 10.0
OTHER_HASH = "f" * 64


def wait_until(condition, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Coordinator:
    """Answers fetch requests by putting the publication into the inbox (as the downlink does)."""

    def __init__(self, inbox: AdapterInbox):
        self.inbox = inbox
        self.requests: list[FetchRequest] = []
        self.answers: dict[int, AdapterPublication] = {}
        self._lock = threading.Lock()

    def fetch(self, request: FetchRequest) -> None:
        with self._lock:
            self.requests.append(request)
        answer = self.answers.get(request.adapter_version)
        if answer is not None:
            threading.Timer(0.05, self.inbox.put, [answer]).start()  # arrives a little later

    def asked(self) -> list[int]:
        with self._lock:
            return [r.adapter_version for r in self.requests]


class Device:
    def __init__(self, tmp_path, files, policy: FetchPolicy):
        model = files.model
        self.hash = model.weights_hash
        self.data = load_local_data(files.device_data_path, model, 0.25, 0)
        self.store = AdapterStore(tmp_path / "adapters", self.hash)
        self.inbox = AdapterInbox()
        self.coordinator = Coordinator(self.inbox)
        self.choice = own_choice(self.store, tmp_path)
        self.runner = JobRunner(
            {}, lambda s: None, JobHistory(tmp_path / "j.json"), base_model_hash="h"
        )
        self.reconciler = Reconciler(
            data=self.data,
            store=self.store,
            inbox=self.inbox,
            send_fetch=self.coordinator.fetch,
            between_jobs=self.runner.run_between_jobs,
            choice=self.choice,
            policy=policy,
            rng=random.Random(0),
        )

    def publication(self, version: int, base_hash: str | None = None, scale=0.01, arrays=None):
        model = self.data.model
        arrays = arrays or {
            f"delta{k + 1}": np.full((d, model.n_classes), scale, np.float32)
            for k, d in enumerate(model.layer_input_dims)
        }
        lineage = Lineage("r1", ("dev-1",), "fedavg")
        return AdapterPublication(version, base_hash or self.hash, "default", arrays, lineage, 1.0)

    def desired(self, version: int | None, base_hash: str | None = None,
                only_if_better: bool = False) -> DesiredState:  # fmt: skip
        return DesiredState(version, base_hash or self.hash, "default", only_if_better)

    def running(self) -> int | None:
        current = self.store.current
        return None if current is None else current.meta.version

    def install(self, version: int) -> None:
        arrays = self.publication(version).arrays
        self.store.install(
            arrays, version=version, base_model_hash=self.hash, source=AdapterSource.COORDINATOR
        )


@pytest.fixture
def device(tmp_path, fan_files):  # noqa: F811
    d = Device(tmp_path, fan_files, FetchPolicy(retry_seconds=5.0, max_fetches=3))
    d.runner.start()
    d.reconciler.start()
    yield d
    d.reconciler.stop()
    d.runner.stop()


def test_a_new_desired_version_is_fetched_installed_and_the_old_one_kept(device):
    device.install(3)
    device.coordinator.answers[7] = device.publication(7)
    device.reconciler.offer(device.desired(7))
    wait_until(lambda: device.running() == 7)
    assert device.coordinator.asked() == [7]
    current = device.store.current
    assert current.meta.source is AdapterSource.COORDINATOR
    assert current.meta.details == {"desired_state": True}
    assert device.store.previous.meta.version == 3  # kept for rollback


def test_a_version_at_hand_is_installed_without_asking(device):
    device.inbox.put(device.publication(5))  # pushed by the coordinator before the pointer
    device.reconciler.offer(device.desired(5))
    wait_until(lambda: device.running() == 5)
    device.reconciler.offer(device.desired(None))
    wait_until(lambda: device.store.current is None)
    for version in range(30, 34):  # push 5 out of the inbox (it keeps the latest 4)
        device.inbox.put(device.publication(version))
    assert device.inbox.get(5) is None
    device.reconciler.offer(device.desired(5))  # back again: the store kept it as previous
    wait_until(lambda: device.running() == 5)
    assert device.coordinator.asked() == []


def test_none_means_the_base_model_alone_with_the_adapter_kept_for_rollback(device):
    device.install(4)
    device.reconciler.offer(device.desired(None))
    wait_until(lambda: device.store.current is None)
    assert device.store.previous.meta.version == 4
    assert device.store.rollback().meta.version == 4


def test_the_running_version_is_left_alone(device, caplog):
    device.install(6)
    with caplog.at_level(logging.DEBUG, logger="agent.reconcile"):
        device.reconciler.offer(device.desired(6))
        wait_until(lambda: "running already" in caplog.text)
    assert device.coordinator.asked() == [] and device.store.previous is None


def test_a_pointer_for_another_base_model_is_refused_and_logged(device, caplog):
    with caplog.at_level(logging.ERROR, logger="agent.reconcile"):
        device.reconciler.offer(device.desired(8, base_hash=OTHER_HASH))
        wait_until(lambda: "refused" in caplog.text)
    assert "base model ffffffff" in caplog.text
    assert device.coordinator.asked() == [] and device.running() is None


def test_a_publication_for_another_base_model_is_refused(device, caplog):
    device.coordinator.answers[9] = device.publication(9, base_hash=OTHER_HASH)
    with caplog.at_level(logging.ERROR, logger="agent.reconcile"):
        device.reconciler.offer(device.desired(9))
        wait_until(lambda: "refused" in caplog.text)
    assert device.coordinator.asked() == [9] and device.running() is None


def test_a_huge_but_finite_adapter_sent_to_the_device_is_refused_not_installed(device, caplog):
    """issue 10, failure 2: an agent installed a 1e30 adapter it was sent (finite, so no NaN
    check caught it). It is refused like any adapter that does not fit the model."""
    device.install(2)
    device.coordinator.answers[11] = device.publication(11, scale=1e30)
    with caplog.at_level(logging.ERROR, logger="agent.reconcile"):
        device.reconciler.offer(device.desired(11))
        wait_until(lambda: "refused" in caplog.text)
    assert "beyond the bound" in caplog.text
    assert device.coordinator.asked() == [11] and device.running() == 2


def test_fetches_repeat_with_backoff_and_stop_after_the_bound(tmp_path, fan_files, caplog):  # noqa: F811
    d = Device(tmp_path, fan_files, FetchPolicy(retry_seconds=0.02, max_fetches=3))
    d.runner.start()
    d.reconciler.start()
    try:
        with caplog.at_level(logging.WARNING, logger="agent.reconcile"):
            d.reconciler.offer(d.desired(11))  # nobody answers
            wait_until(lambda: "did not arrive after 3 requests" in caplog.text)
        assert d.coordinator.asked() == [11, 11, 11] and d.running() is None
        d.coordinator.answers[11] = d.publication(11)
        d.reconciler.offer(d.desired(11))  # the pointer again (a reconnect): a new budget
        wait_until(lambda: d.running() == 11)
    finally:
        d.reconciler.stop()
        d.runner.stop()


def test_the_waits_double_with_jitter_up_to_the_cap():
    policy = FetchPolicy(retry_seconds=10.0, max_fetches=8, cap_seconds=60.0)
    rng = random.Random(1)
    for attempt, ceiling in enumerate([10, 20, 40, 60, 60]):
        waits = [policy.wait(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 10  # jittered, not in lock step


def test_a_newer_pointer_takes_over_from_a_wait_for_an_older_one(device):
    device.reconciler.offer(device.desired(20))  # never answered; would wait 2.5-5 s
    wait_until(lambda: device.coordinator.asked() == [20])
    device.reconciler.offer(device.desired(20))  # the same pointer re-delivered: no new request
    device.coordinator.answers[21] = device.publication(21)
    started = time.monotonic()
    device.reconciler.offer(device.desired(21))
    wait_until(lambda: device.running() == 21)
    assert time.monotonic() - started < 2.0
    assert device.coordinator.asked() == [20, 21]


# -- only_if_better: the device's own choice ----------------------------------------------------
def test_a_worse_desired_version_is_declined_once_and_not_fetched_again(
    device,
    good_arrays,  # noqa: F811
    caplog,
):
    mine = device.store.install(good_arrays, version=None, base_model_hash=device.hash,
                                source=AdapterSource.FINETUNE)  # fmt: skip
    device.coordinator.answers[14] = device.publication(14, scale=0.0)  # runs like the base
    with caplog.at_level(logging.INFO, logger="agent.reconcile"):
        device.reconciler.offer(device.desired(14, only_if_better=True))
        wait_until(lambda: "declined, keeping what runs" in caplog.text)
    assert device.store.current.slot == mine.slot and device.coordinator.asked() == [14]
    with caplog.at_level(logging.DEBUG, logger="agent.reconcile"):
        device.reconciler.offer(device.desired(None))  # something else in between, then
        wait_until(lambda: device.store.current is None)  # (no judging: takes it as is)
        device.store.rollback()  # back to the personal adapter the decline was made against
        device.reconciler.offer(device.desired(14, only_if_better=True))  # a reconnect
        wait_until(lambda: "declined before" in caplog.text)
    assert device.coordinator.asked() == [14] and device.store.current.slot == mine.slot


def test_a_better_desired_version_is_installed(device, good_arrays):  # noqa: F811
    device.coordinator.answers[15] = device.publication(15, arrays=good_arrays)
    device.reconciler.offer(device.desired(15, only_if_better=True))
    wait_until(lambda: device.running() == 15)
    assert device.store.origin.value == "fleet"


def test_the_base_model_as_desired_state_is_judged_too(device, good_arrays):  # noqa: F811
    device.store.install(good_arrays, version=None, base_model_hash=device.hash,
                         source=AdapterSource.FINETUNE)  # fmt: skip
    device.reconciler.offer(device.desired(None, only_if_better=True))
    wait_until(lambda: device.choice.declined(0))
    assert device.store.origin.value == "personal"


def test_a_device_without_labels_takes_the_desired_version_as_is(tmp_path, unlabelled_files):  # noqa: F811
    d = Device(tmp_path, unlabelled_files, FetchPolicy(retry_seconds=5.0, max_fetches=3))
    d.runner.start()
    d.reconciler.start()
    try:
        d.coordinator.answers[16] = d.publication(16, scale=0.0)
        d.reconciler.offer(d.desired(16, only_if_better=True))
        wait_until(lambda: d.running() == 16)
    finally:
        d.reconciler.stop()
        d.runner.stop()


def test_a_pointer_offering_a_job_goes_to_the_runner_and_its_re_delivery_is_reconciled(
    tmp_path,
    fan_files,  # noqa: F811
):
    d = Device(tmp_path, fan_files, FetchPolicy(retry_seconds=5.0, max_fetches=3))
    taken = []

    def take_offer(job):  # the runner's: a job id it has seen is not taken again
        fresh = job.job_id not in {j.job_id for j in taken}
        taken.append(job)
        return fresh

    d.reconciler = Reconciler(data=d.data, store=d.store, inbox=d.inbox,
                              send_fetch=d.coordinator.fetch,
                              between_jobs=d.runner.run_between_jobs, choice=d.choice,
                              take_offer=take_offer, policy=FetchPolicy(5.0, 3))  # fmt: skip
    d.runner.start()
    d.reconciler.start()
    try:
        offer = DesiredState(7, d.hash, "default", True, job_id="apply-7", expires_at=2e9)
        d.reconciler.offer(offer)
        (job,) = taken
        assert (job.job_id, job.params.adapter_version, job.params.only_if_better) == (
            "apply-7",
            7,
            True,
        )
        time.sleep(0.2)  # the reconciler has nothing to do: the job does it
        assert d.coordinator.asked() == [] and d.running() is None
        d.coordinator.answers[7] = d.publication(7)
        d.reconciler.offer(offer)  # re-delivered at a reconnect: reconciled here, unanswered
        wait_until(lambda: d.coordinator.asked() == [7])
        assert len(taken) == 2
    finally:
        d.reconciler.stop()
        d.runner.stop()
