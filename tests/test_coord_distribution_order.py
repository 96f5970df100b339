"""A promotion sends each device one message: the retained pointer, its adapter inline.

Found with the load generator (skipfleet.loadgen): with the pointer before the adapter, every
agent had nothing to install yet, sent a FetchRequest, and the coordinator read the adapter from
disk and published it once more per device. Then the adapter, the apply job and the pointer went
out as three messages; now the pointer carries the adapter (up to INLINE_ADAPTER_MAX_BYTES) and
the offer (an APPLY_ADAPTER job id) in one. The adapter is read from the store once per
distribution.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from coordinator import outbox
from coordinator.clock import ManualClock
from coordinator.outbox import AdapterRef, DurableOutbox
from coordinator.service import SCAN_INTERVAL_S, FleetService
from coordinator.state_db import StateDB
from shared.protocol import (
    AdapterPublication,
    DesiredState,
    Job,
    JobKind,
    JobState,
    Lineage,
    encode_for_publish,
)
from tests.coord_fleet_helpers import SimDevice, jobs_in, make_config

DEVICES = ("pi-1", "pi-2", "pi-3")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def to_canary(service: FleetService, devices: list[SimDevice]) -> list:
    """One round up to its canary; returns what the canary step sent."""
    by_name = {d.device_id: d for d in devices}
    service.request_finetune(all_=True)
    for device, job in jobs_in(service.tick(), JobKind.FINETUNE):
        service.ingest(by_name[device].finetune(job.job_id))
    return service.tick()


def answer_canaries(service: FleetService, devices: list[SimDevice], outbound) -> None:
    """In favour of the candidate: the last answer promotes it and distributes it."""
    by_name = {d.device_id: d for d in devices}
    for device, job in jobs_in(outbound, JobKind.EVALUATE):
        accuracy = 0.9 if job.params.adapter_version == 1 else 0.6
        service.ingest([by_name[device].status(job.job_id, JobState.SUCCEEDED,
                                               {"accuracy": accuracy})])  # fmt: skip


def kinds_for(outbound, device: str) -> list[str]:
    names = {AdapterPublication: "adapter", DesiredState: "desired", Job: "job"}
    return [names[type(o.message)] for o in outbound if o.device_id == device]


def pointer_for(outbound, device: str) -> DesiredState:
    (pointer,) = [o.message for o in outbound if o.device_id == device]
    assert isinstance(pointer, DesiredState)
    return pointer


def test_promotion_sends_each_device_one_pointer_with_the_adapter_and_the_offer(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in DEVICES]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    canary = to_canary(service, devices)
    reads = []
    store = service.fleet.store
    original = store.get
    store.get = lambda *args, **kwargs: reads.append(args) or original(*args, **kwargs)
    answer_canaries(service, devices, canary)  # promoted: distributed to the cohort
    outbound = service.tick()
    for device in DEVICES:
        pointer = pointer_for(outbound, device)  # one message, where there were three
        assert pointer.adapter is not None and pointer.adapter.version == 1
        offer = pointer.apply_job()
        assert offer is not None and offer.params.only_if_better  # labelled: offered
        assert service.fleet.jobs.require(offer.job_id).kind == JobKind.APPLY_ADAPTER.value
    assert len(reads) == 1  # one read of the version for the whole cohort
    # the offer's one answer settles it, as an apply job's did
    by_name = {d.device_id: d for d in devices}
    for device, job in jobs_in(outbound, JobKind.APPLY_ADAPTER):
        service.ingest([by_name[device].status(job.job_id, JobState.SUCCEEDED)])
    assert {d["adapter_version"] for d in service.devices()} == {1}


def test_a_promotion_reads_the_busy_devices_once_and_offers_a_busy_one_nothing_to_answer(
    tmp_path, clock
):
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in DEVICES]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    canary = to_canary(service, devices)
    jobs = service.fleet.jobs
    jobs.create("pi-3", timeout_s=600.0, kind=JobKind.EVALUATE.value)  # busy at the promotion
    asked: list[str | None] = []
    active, busy_devices = jobs.active, jobs.busy_devices
    jobs.active = lambda device_id=None: asked.append(device_id) or active(device_id)
    jobs.busy_devices = lambda: asked.append("all") or busy_devices()
    answer_canaries(service, devices, canary)  # promoted: distributed to the cohort
    outbound = service.tick()
    assert asked.count("all") == 1 and not set(DEVICES) & set(asked)
    for device in DEVICES:
        pointer = pointer_for(outbound, device)
        assert pointer.adapter is not None and pointer.adapter.version == 1
        assert (pointer.apply_job() is None) == (device == "pi-3")  # busy: the pointer alone


def test_a_device_caught_up_later_gets_the_pointer_with_the_adapter_and_an_offer(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    pi1, pi2 = SimDevice("pi-1", clock), SimDevice("pi-2", clock)
    service.ingest([pi1.presence(), pi1.heartbeat(), pi2.presence(), pi2.heartbeat()])
    service.ingest([pi2.presence(online=False)])
    answer_canaries(service, [pi1], to_canary(service, [pi1]))
    away = pointer_for(service.tick(), "pi-2")  # offline: the pointer, no offer to answer
    assert away.adapter is not None and away.apply_job() is None
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([pi2.presence(), pi2.heartbeat()])
    back = pointer_for(service.tick(), "pi-2")
    assert back.adapter is not None and back.apply_job() is not None


def test_an_adapter_over_the_inline_bound_is_left_for_the_device_to_fetch(
    tmp_path, clock, monkeypatch
):
    monkeypatch.setattr(outbox, "INLINE_ADAPTER_MAX_BYTES", 64)
    service = FleetService(make_config(tmp_path), clock=clock)
    devices = [SimDevice(name, clock) for name in DEVICES]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    answer_canaries(service, devices, to_canary(service, devices))
    outbound = service.tick()
    for device in DEVICES:
        pointer = pointer_for(outbound, device)
        assert pointer.adapter is None and pointer.apply_job() is not None
    service.ingest([devices[0].fetch(1)])  # the device asks: the answer is the publication
    (answer,) = service.tick()
    assert isinstance(answer.message, AdapterPublication) and answer.message.version == 1


@pytest.mark.parametrize(("publish_limit", "inline"), [(131_072, True), (4096, False)])
def test_a_pointer_carries_its_adapter_only_if_the_whole_fits_one_publish(
    tmp_path, clock, publish_limit, inline
):
    """A retained message is never chunked: a broker keeps only its last chunk."""
    box = DurableOutbox(StateDB(tmp_path / "s.sqlite3"), "coordinator", clock,
                        publish_limit=publish_limit)  # fmt: skip
    arrays = {"delta1": np.ones((52, 20), np.float32)}  # 4.2 KB: over 4096 with the pointer
    adapter = AdapterPublication(2, "b" * 64, "fan", arrays, Lineage("r", ("pi-1",), "m"), 1.0)
    box.add_desired("pi-1", DesiredState(2, "b" * 64, "fan"), AdapterRef("fan", 2, "float32"))
    (out,) = box.hand_out(lambda ref: adapter)
    assert (out.message.adapter is not None) is inline
    carrying = dataclasses.replace(out.message, adapter=adapter)
    publishes = encode_for_publish(carrying, sender="coordinator", limit=publish_limit)
    assert (len(publishes) == 1) is inline  # inline only where the whole is one publish


def test_a_pointer_handed_out_again_after_a_restart_is_the_one_handed_out_before(tmp_path, clock):
    """Handed out from memory in the actor's life that added it, read back from its row after a
    restart: the same pointer, its offer and its adapter inline, either way."""
    box = DurableOutbox(StateDB(tmp_path / "s.sqlite3"), "coordinator", clock,
                        publish_limit=131_072)  # fmt: skip
    arrays = {"delta1": np.ones((8, 4), np.float32)}
    adapter = AdapterPublication(2, "b" * 64, "fan", arrays, Lineage("r", ("pi-1",), "m"), 1.0)
    pointer = DesiredState(2, "b" * 64, "fan", only_if_better=True, job_id="job-1",
                           expires_at=clock() + 60)  # fmt: skip
    box.add_desired("pi-1", pointer, AdapterRef("fan", 2, "float32"))
    (first,) = box.hand_out(lambda ref: adapter)
    restarted = DurableOutbox(StateDB(tmp_path / "s.sqlite3"), "coordinator", clock,
                              publish_limit=131_072)  # fmt: skip
    (again,) = restarted.hand_out(lambda ref: adapter)
    assert again.message == first.message == pointer  # (equality leaves the adapter out)
    assert again.message.adapter is first.message.adapter is adapter
    assert again.message.apply_job().job_id == "job-1"


def test_a_row_that_cannot_be_built_holds_back_no_other_and_stays_for_the_next_start(
    tmp_path, clock
):
    """Any error building one row (here: reading its adapter raises) costs that row's hand-out
    only: the other rows of the same hand-out go out, and the row stays in the outbox."""
    db = StateDB(tmp_path / "s.sqlite3")
    box = DurableOutbox(db, "coordinator", clock, publish_limit=1 << 20)
    box.add("pi-1", DesiredState(None, "b" * 64, "fan"))
    box.add_adapter("pi-2", AdapterRef("fan", 2, "float32"))
    box.add("pi-3", DesiredState(None, "b" * 64, "fan"))

    def broken_store(ref: AdapterRef) -> AdapterPublication:
        raise RuntimeError("the adapter store is broken")

    handed = box.hand_out(broken_store)
    assert [o.device_id for o in handed] == ["pi-1", "pi-3"]
    assert box.backlog() == 3  # nothing acknowledged yet, and the broken row not dropped
    box.mark_sent(o.seq for o in handed)
    again = DurableOutbox(db, "coordinator", clock, publish_limit=1 << 20)  # the next start
    assert [o.device_id for o in again.hand_out(broken_store)] == []
    assert again.backlog() == 1


def test_a_version_from_ten_thousand_devices_is_as_small_on_the_wire_as_one_from_one():
    """Its contributors stay with the coordinator: a lineage naming all of them grew the
    publication with the fleet, and past ~2,000 devices no adapter fitted inside its pointer."""
    from coordinator.adapter_store import AdapterVersion, StoredAdapter
    from coordinator.outbound import publication
    from shared.protocol import adapter_wire_bytes

    arrays = {"delta1": np.ones((52, 20), np.float32)}

    def published(devices: int) -> AdapterPublication:
        ids = tuple(f"sim-{i:05d}" for i in range(devices))
        meta = AdapterVersion("fan", 3, "b" * 64, "coordinate-median", ids, "round-9", 2, 1.0,
                              "adapters/fan/3.npz", "0" * 64)  # fmt: skip
        return publication(StoredAdapter(meta, arrays), "float32")

    one, many = published(1), published(10_000)
    assert adapter_wire_bytes(many) == adapter_wire_bytes(one) < outbox.INLINE_ADAPTER_MAX_BYTES
    assert many.lineage.device_ids == () and many.lineage.parent_version == 2
    assert many.lineage.round_id == "round-9" and many.lineage.algorithm == "coordinate-median"
