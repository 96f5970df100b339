"""One bad device must not hurt the fleet (the fleet state alone, no Ray or MQTT): a liar's
weight and update are bounded and its canary answers do not count, a report beyond the value
bound is refused without failing its round, and no stage of a run waits forever."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.clock import ManualClock
from coordinator.federation import FederationPolicy
from coordinator.pipeline import AGGREGATION_TIMEOUT_S
from coordinator.rollout import RolloutPolicy
from coordinator.service import FleetService
from shared.protocol import JobKind
from tests.coord_fleet_helpers import SimDevice, jobs_in, make_config
from tests.coord_helpers import SHAPE

HONEST = ("pi-1", "pi-2", "pi-3")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def start(tmp_path, clock, *, aggregator=None, **policy) -> FleetService:
    config = make_config(
        tmp_path,
        federation=FederationPolicy(max_rounds=1),
        rollout=RolloutPolicy(canary_fraction=1.0, min_canaries=2),
        **policy,
    )
    return FleetService(config, clock=clock, aggregator=aggregator)


def deltas(value: float) -> dict[str, np.ndarray]:
    return {f"delta{k}": np.full(SHAPE.delta_shape(k), value, np.float32) for k in SHAPE.layers}


def join(service, clock, *names) -> dict[str, SimDevice]:
    devices = {n: SimDevice(n, clock) for n in names}
    service.ingest([m for d in devices.values() for m in (d.presence(), d.heartbeat())])
    return devices


def test_a_poisoning_device_is_bounded_and_its_canary_answers_do_not_count(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, *HONEST, "liar")
    service.request_finetune(all_=True)
    for device, job in jobs_in(service.tick(), JobKind.FINETUNE):
        lie = device == "liar"
        service.ingest(devices[device].finetune(
            job.job_id, arrays=deltas(500.0 if lie else 0.01 * (1 + HONEST.index(device) % 2)),
            samples=2**62 if lie else 100, before=0.5,
        ))  # fmt: skip
    outbound = service.tick()
    (round_view,) = service.rounds()
    bounded = round_view["outcomes"]["all"]["bounded"]
    assert set(bounded) == {"liar"}
    assert "registered 100" in bounded["liar"] and "clipped" in bounded["liar"]
    weights = round_view["weights"]
    assert weights["liar"] == pytest.approx(weights["pi-1"])  # its claim bought it nothing
    (stored,) = service.adapters()[0]["versions"]
    canaries = {d for d, _ in jobs_in(outbound, JobKind.EVALUATE)}
    assert canaries == set(HONEST)  # an outlier never judges its own work
    assert stored["cluster"] == "all"


def test_a_report_beyond_the_value_bound_fails_its_device_not_its_round(tmp_path, clock):
    service = start(tmp_path, clock, min_completion_ratio=0.8)
    devices = join(service, clock, *HONEST, "liar")
    service.request_finetune(all_=True)
    for device, job in jobs_in(service.tick(), JobKind.FINETUNE):
        arrays = deltas(1e30 if device == "liar" else 0.01)
        service.ingest(devices[device].finetune(job.job_id, arrays=arrays, before=0.5))
    service.tick()
    (round_view,) = service.rounds()
    assert round_view["stage"] == "STORED"  # 3 of the 3 that count: 0.8 is met
    assert "refused" in round_view["failures"]["liar"]
    assert sorted(round_view["weights"]) == list(HONEST)
    assert not jobs_in(service.tick(), JobKind.FINETUNE)  # no retry for a refused report


class LosingAggregator:
    """Accepts every aggregation and never returns one (a task lost with its worker)."""

    def submit(self, request, algorithms) -> None:
        pass

    def collect(self) -> list:
        return []

    def pending(self) -> set[str]:
        return set()


def test_an_aggregation_that_never_returns_ends_the_run_instead_of_wedging_it(tmp_path, clock):
    service = start(tmp_path, clock, aggregator=LosingAggregator())
    devices = join(service, clock, *HONEST)
    service.request_finetune(all_=True)
    for device, job in jobs_in(service.tick(), JobKind.FINETUNE):
        service.ingest(devices[device].finetune(job.job_id, arrays=deltas(0.01), before=0.5))
    service.tick()
    assert service.runs()[0]["clusters"]["all"]["stage"] == "AGGREGATING"
    clock.advance(AGGREGATION_TIMEOUT_S + 1)
    service.tick()
    (run,) = service.runs()
    assert run["state"] == "DONE"
    assert "aggregation did not finish" in run["clusters"]["all"]["note"]
    service.ingest([d.heartbeat() for d in devices.values()])  # still there
    started = service.request_finetune(all_=True)  # the cohort is free again
    assert started["rounds"] and not started["skipped"]
    assert service.health()["status"] == "ok"


def test_a_silent_device_holds_no_fleet_slot_and_is_quarantined_after_timeouts(tmp_path, clock):
    """Jobs to a device that went silent do not keep others from training, and a device that
    keeps letting jobs time out is left alone for a while, then tried again."""
    service = start(tmp_path, clock, max_concurrent_jobs=1, job_timeout_s=30.0,
                    heartbeat_timeout_s=20.0, quarantine_after=2, quarantine_s=300.0,
                    max_attempts=5, round_deadline_s=1000.0)  # fmt: skip
    devices = {"mute": SimDevice("mute", clock), "pi-1": SimDevice("pi-1", clock, cohort="hvac")}
    service.ingest([m for d in devices.values() for m in (d.presence(), d.heartbeat())])
    service.request_finetune(devices=["mute"])
    assert [d for d, _ in jobs_in(service.tick(), JobKind.FINETUNE)] == ["mute"]
    clock.advance(25)  # mute went silent: its job no longer takes the fleet's one slot
    service.ingest([devices["pi-1"].heartbeat()])
    service.request_finetune(devices=["pi-1"])
    assert [d for d, _ in jobs_in(service.tick(), JobKind.FINETUNE)] == ["pi-1"]
    for _ in range(2):  # two timeouts in a row (it comes back just long enough for a retry)
        clock.advance(31)
        service.ingest([devices["mute"].heartbeat(), devices["pi-1"].heartbeat()])
        service.tick()
    mute = next(d for d in service.devices() if d["device_id"] == "mute")
    assert mute["timeouts_in_a_row"] == 2 and mute["quarantined_until"] > clock()
    assert service.metrics_report().snapshot.devices_quarantined == 1
    clock.advance(1)
    service.ingest([devices["mute"].heartbeat()])
    assert jobs_in(service.tick(), JobKind.FINETUNE) == []  # its retry waits
    mute = next(d for d in service.devices() if d["device_id"] == "mute")
    assert mute["last_skip_reason"] == "quarantined"
    clock.advance(300)
    service.ingest([devices["mute"].heartbeat()])
    assert [d for d, _ in jobs_in(service.tick(), JobKind.FINETUNE)] == ["mute"]  # tried again
