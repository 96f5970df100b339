"""A promotion sends each device the adapter before its retained desired pointer.

Found with the load generator (skipfleet.loadgen): with the pointer first, every agent had
nothing to install yet, sent a FetchRequest, and the coordinator read the adapter from disk and
published it once more per device: 1,000 extra requests, reads and publications per promotion
of a 1,000-device cohort. The adapter is also read from the store once per distribution.
"""

from __future__ import annotations

import pytest

from coordinator.clock import ManualClock
from coordinator.service import SCAN_INTERVAL_S, FleetService
from shared.protocol import AdapterPublication, DesiredState, Job, JobKind, JobState
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


def test_promotion_sends_the_adapter_then_the_job_then_the_pointer(tmp_path, clock):
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
        assert kinds_for(outbound, device) == ["adapter", "job", "desired"], device
    assert len(reads) == 1  # one read of the version for the whole cohort


def test_a_device_caught_up_later_gets_the_adapter_before_the_pointer(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    pi1, pi2 = SimDevice("pi-1", clock), SimDevice("pi-2", clock)
    service.ingest([pi1.presence(), pi1.heartbeat(), pi2.presence(), pi2.heartbeat()])
    service.ingest([pi2.presence(online=False)])
    answer_canaries(service, [pi1], to_canary(service, [pi1]))
    assert kinds_for(service.tick(), "pi-2") == ["desired"]  # offline: the pointer only
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([pi2.presence(), pi2.heartbeat()])
    assert kinds_for(service.tick(), "pi-2") == ["adapter", "job", "desired"]
