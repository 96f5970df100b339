"""The fleet state's pipeline without Ray or MQTT: FleetService over a tmp state dir, a manual
clock, and simulated devices answering the commands it emits."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.clock import ManualClock
from coordinator.fleet import Conflict, FleetRequestError, NotFound, task_name
from coordinator.observations import (
    AggregationTimed,
    FinetuneReported,
    JobTransition,
    MessageRejected,
    RolloutDecided,
    RolloutResult,
    RoundFinished,
    RoundResult,
)
from coordinator.service import SCAN_INTERVAL_S, FleetService
from shared.protocol import (
    BASE_MODEL_VERSION,
    AdapterPublication,
    DesiredState,
    JobKind,
    JobReason,
    JobState,
)
from tests.coord_fleet_helpers import (
    LostAggregations,
    SimDevice,
    finetune_jobs,
    jobs_in,
    make_config,
)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def start(tmp_path, clock, **policy) -> FleetService:
    return FleetService(make_config(tmp_path, **policy), clock=clock)


def join(service: FleetService, clock: ManualClock, *names: str) -> list[SimDevice]:
    devices = [SimDevice(name, clock) for name in names]
    service.ingest([m for d in devices for m in (d.presence(), d.heartbeat())])
    return devices


def finetune_all(service: FleetService, devices: list[SimDevice], outbound, **report) -> None:
    """Every device answers its fine-tune job among `outbound` with a valid report."""
    by_name = {d.device_id: d for d in devices}
    for device, job in jobs_in(outbound, JobKind.FINETUNE):
        service.ingest(by_name[device].finetune(job.job_id, **report))


def answer_canaries(service, devices, outbound, candidate: float, current: float) -> None:
    """Each canary measures the candidate and the cohort's current fleet version (older)."""
    by_name = {d.device_id: d for d in devices}
    evaluations = jobs_in(outbound, JobKind.EVALUATE)
    reference = min(j.params.adapter_version for _, j in evaluations)
    for device, job in evaluations:
        accuracy = current if job.params.adapter_version == reference else candidate
        service.ingest(
            [by_name[device].status(job.job_id, JobState.SUCCEEDED, {"accuracy": accuracy})]
        )


def events(service: FleetService, kind: type) -> list:
    return [e for e in service.metrics_report().events if isinstance(e, kind)]


def test_a_round_goes_from_request_to_an_adapter_applied_on_every_device(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    started = service.request_finetune(all_=True)
    assert [r["devices"] for r in started["rounds"]] == [["pi-1", "pi-2", "pi-3"]]

    outbound = service.tick()
    assert len(jobs_in(outbound, JobKind.FINETUNE)) == 3
    finetune_all(service, devices, outbound)
    outbound = service.tick()  # closes the round, aggregates, starts the canary

    (round_view,) = service.rounds()
    assert round_view["stage"] == "STORED" and round_view["adapter_version"] == 1
    assert round_view["algorithm"] == "coordinate-median"  # the default
    assert len(round_view["gap"]["relative_frobenius"]) == 3
    assert sum(round_view["weights"].values()) == pytest.approx(1.0)
    publications = [o for o in outbound if isinstance(o.message, AdapterPublication)]
    assert {o.device_id for o in publications} == {"pi-1", "pi-2", "pi-3"}  # canary fraction 1
    assert len(jobs_in(outbound, JobKind.EVALUATE)) == 6  # candidate and current, per canary

    evaluated = {job.params.adapter_version for _, job in jobs_in(outbound, JobKind.EVALUATE)}
    assert evaluated == {1, BASE_MODEL_VERSION}  # the first version must beat the bare base
    answer_canaries(service, devices, outbound, candidate=0.9, current=0.85)
    outbound = service.tick()
    applies = jobs_in(outbound, JobKind.APPLY_ADAPTER)
    assert sorted(d for d, _ in applies) == ["pi-1", "pi-2", "pi-3"]
    assert all(job.params.adapter_version == 1 for _, job in applies)
    desired = [o for o in outbound if isinstance(o.message, DesiredState)]
    assert {o.message.adapter_version for o in desired} == {1}

    by_name = {d.device_id: d for d in devices}
    for device, job in applies:
        service.ingest([by_name[device].status(job.job_id, JobState.SUCCEEDED)])
    assert {d["device_id"]: d["adapter_version"] for d in service.devices()} == {
        "pi-1": 1,
        "pi-2": 1,
        "pi-3": 1,
    }
    (cohort,) = service.adapters()
    assert cohort["current_version"] == 1 and cohort["rollouts"][0]["state"] == "PROMOTED"
    report = service.metrics_report()
    assert report.snapshot.adapter_versions == {cohort["cohort"]: 1}
    kinds = {type(e) for e in report.events}
    assert {JobTransition, FinetuneReported, AggregationTimed, RoundFinished} <= kinds
    assert RolloutDecided(RolloutResult.PROMOTED) in report.events


def test_a_regressing_candidate_is_rolled_back_and_nothing_is_applied(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    service.request_finetune(devices=["pi-1", "pi-2"])
    finetune_all(service, devices, service.tick())
    outbound = service.tick()
    answer_canaries(service, devices, outbound, candidate=0.5, current=0.9)
    outbound = service.tick()
    assert jobs_in(outbound, JobKind.APPLY_ADAPTER) == []
    (cohort,) = service.adapters()
    assert cohort["current_version"] is None
    assert cohort["rollouts"][0]["state"] == "ROLLED_BACK"
    assert "regression" in cohort["rollouts"][0]["reason"]
    assert RolloutDecided(RolloutResult.ROLLED_BACK) in events(service, RolloutDecided)


def test_a_canary_that_fails_its_evaluation_rolls_back_at_once(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1")
    service.request_finetune(devices=["pi-1"])
    finetune_all(service, devices, service.tick())
    outbound = service.tick()
    (_, job), _ = jobs_in(outbound, JobKind.EVALUATE)
    service.ingest([devices[0].status(job.job_id, JobState.FAILED)])
    (cohort,) = service.adapters()
    assert cohort["rollouts"][0]["state"] == "ROLLED_BACK"


def test_a_silent_device_does_not_stall_the_round_past_its_deadline(tmp_path, clock):
    service = start(tmp_path, clock, round_deadline_s=100.0, job_timeout_s=30.0, max_attempts=1)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    service.request_finetune(all_=True)
    outbound = service.tick()
    answering = [(d, j) for d, j in jobs_in(outbound, JobKind.FINETUNE) if d != "pi-3"]
    finetune_all(service, devices, [o for o in outbound if o.device_id != "pi-3"])
    assert len(answering) == 2
    service.tick()
    assert service.rounds()[0]["stage"] == "RUNNING"  # pi-3 may still answer
    clock.advance(31.0)  # pi-3's job times out (no retry left): the round can close
    service.tick()
    (round_view,) = service.rounds()
    assert round_view["stage"] == "STORED"
    assert set(round_view["answered"]) == {"pi-1", "pi-2"}
    assert "pi-3" in round_view["failures"] and "TIMED_OUT" in round_view["failures"]["pi-3"]


def test_a_round_with_too_few_answers_fails_at_its_deadline(tmp_path, clock):
    service = start(tmp_path, clock, round_deadline_s=50.0, min_completion_ratio=1.0)
    join(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    service.tick()
    clock.advance(51.0)
    service.tick()
    (round_view,) = service.rounds()
    assert round_view["stage"] == "FAILED" and round_view["adapter_version"] is None
    assert RoundFinished(RoundResult.FAILED, 51.0) in events(service, RoundFinished)


def test_invalid_reports_fail_their_job_and_are_counted(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3", "pi-4")
    jobs = finetune_jobs(service)
    good = devices[3].report(jobs["pi-4"].job_id)
    service.ingest([good])  # the first accepted report fixes the cohort's adapter shape
    nan = {name: np.full_like(a, np.nan) for name, a in good.envelope.message.adapter.items()}
    service.ingest([devices[0].report(jobs["pi-1"].job_id, arrays=nan)])
    service.ingest([devices[1].report(jobs["pi-2"].job_id, base_hash="c" * 64)])
    wrong_shape = {"A1": np.ones((5, 2), np.float32), "B1": np.ones((2, 3), np.float32)}
    service.ingest([devices[2].report(jobs["pi-3"].job_id, arrays=wrong_shape)])
    states = {j["device_id"]: (j["state"], j["detail"]) for j in service.jobs()}
    # a report taken is its job's SUCCEEDED
    assert [states[d][0] for d in ("pi-1", "pi-2", "pi-3", "pi-4")] == ["FAILED"] * 3 + [
        "SUCCEEDED"
    ]
    assert "NaN" in states["pi-1"][1] and "base model" in states["pi-2"][1]
    assert "the cohort's is (12, 8, 8)" in states["pi-3"][1]
    assert events(service, MessageRejected).count(MessageRejected("invalid_report")) == 3


def test_statuses_for_unknown_or_foreign_jobs_are_rejected_and_duplicates_ignored(tmp_path, clock):
    service = start(tmp_path, clock)
    pi1, pi2 = join(service, clock, "pi-1", "pi-2")
    service.request_finetune(devices=["pi-1"])
    ((_, job),) = jobs_in(service.tick(), JobKind.FINETUNE)
    service.ingest([pi1.status("nope", JobState.IN_PROGRESS)])
    service.ingest([pi2.status(job.job_id, JobState.IN_PROGRESS)])
    service.ingest([pi1.status(job.job_id, JobState.REJECTED, reason_code=JobReason.DUPLICATE)])
    assert service.jobs()[0]["state"] == "QUEUED"
    reasons = {e.reason for e in events(service, MessageRejected)}
    assert reasons == {"unknown_job", "not_owner"}


def test_a_restarted_service_carries_on_with_a_running_round(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    outbound = service.tick()
    first, second = jobs_in(outbound, JobKind.FINETUNE)
    service.ingest(devices[0].finetune(first[1].job_id))
    service.close()

    restarted = start(tmp_path, clock)  # what a restarted actor's __init__ does
    assert [d["device_id"] for d in restarted.devices()] == ["pi-1", "pi-2"]
    restarted.ingest(devices[1].finetune(second[1].job_id))
    restarted.tick()
    assert restarted.rounds()[0]["stage"] == "STORED"


def test_a_report_damaged_on_disk_across_a_restart_fails_its_device_not_its_round(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2", "pi-3")
    jobs = finetune_jobs(service)
    for device in devices[:2]:
        service.ingest(device.finetune(jobs[device.device_id].job_id))
    service.fleet.db.execute(
        "UPDATE fit_reports SET arrays = x'c1' WHERE device_id = 'pi-1'"  # 0xc1: never msgpack
    )
    service.close()
    restarted = start(tmp_path, clock)  # nothing held in memory: the rows are read
    restarted.ingest(devices[2].finetune(jobs["pi-3"].job_id))
    restarted.tick()
    (record,) = restarted.rounds()
    assert record["stage"] == "STORED"
    assert "damaged" in record["failures"]["pi-1"] and set(record["failures"]) == {"pi-1"}


def test_an_aggregation_interrupted_by_a_restart_is_resumed(tmp_path, clock):
    service = FleetService(make_config(tmp_path), aggregator=LostAggregations(), clock=clock)
    devices = join(service, clock, "pi-1")
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    service.tick()
    assert service.rounds()[0]["stage"] == "AGGREGATING"
    service.close()
    restarted = start(tmp_path, clock)
    restarted.tick()
    assert restarted.rounds()[0]["stage"] == "STORED"


def promote_new_version(service, devices) -> None:
    service.ingest([d.heartbeat() for d in devices])
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    answer_canaries(service, devices, service.tick(), candidate=0.9, current=0.9)


def test_a_device_offline_at_promotion_gets_the_adapter_when_it_comes_back(tmp_path, clock):
    service = start(tmp_path, clock)
    pi1, pi2 = join(service, clock, "pi-1", "pi-2")
    service.ingest([pi2.presence(online=False)])
    promote_new_version(service, [pi1])
    outbound = service.tick()
    assert [d for d, _ in jobs_in(outbound, JobKind.APPLY_ADAPTER)] == ["pi-1"]
    assert {o.device_id for o in outbound if isinstance(o.message, DesiredState)} == {
        "pi-1",
        "pi-2",
    }
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([pi2.presence(), pi2.heartbeat()])
    outbound = service.tick()
    assert [d for d, _ in jobs_in(outbound, JobKind.APPLY_ADAPTER)] == ["pi-2"]
    clock.advance(SCAN_INTERVAL_S)  # no second apply while the first is under way
    assert jobs_in(service.tick(), JobKind.APPLY_ADAPTER) == []


def test_a_fetch_is_answered_with_the_adapter_or_counted_as_unknown(tmp_path, clock):
    service = start(tmp_path, clock)
    (pi1,) = join(service, clock, "pi-1")
    promote_new_version(service, [pi1])
    service.tick()
    service.ingest([pi1.fetch(1), pi1.fetch(7)])
    (publication,) = [
        o.message for o in service.tick() if isinstance(o.message, AdapterPublication)
    ]
    assert publication.version == 1 and set(publication.arrays) == {"delta1", "delta2", "delta3"}
    assert publication.lineage.device_ids == ()  # who trained it stays with the coordinator
    assert list(service.adapter(publication.cohort, 1)["meta"]["device_ids"]) == ["pi-1"]
    assert MessageRejected("unknown_adapter") in events(service, MessageRejected)


def test_drift_over_the_threshold_starts_a_round_for_the_cohort(tmp_path, clock):
    service = start(tmp_path, clock, drift_threshold=2.0)
    pi1, _ = join(service, clock, "pi-1", "pi-2")
    service.tick()
    assert service.rounds() == []
    clock.advance(SCAN_INTERVAL_S)
    service.ingest([pi1.heartbeat(drift=2.7)])
    service.tick()
    (round_view,) = service.rounds()
    assert round_view["trigger"] == "drift" and round_view["devices"] == ["pi-1", "pi-2"]


def test_operator_promote_and_rollback(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1")
    promote_new_version(service, devices)
    service.tick()
    cohort = service.adapters()[0]["cohort"]
    with pytest.raises(Conflict, match="no parent"):
        service.rollback(cohort)
    clock.advance(service.config.policy.trigger_cooldown_s)
    promote_new_version(service, devices)  # v2, child of v1
    service.tick()
    assert service.adapters()[0]["current_version"] == 2
    assert service.rollback(cohort)["current_version"] == 1
    assert service.promote(cohort, 2)["current_version"] == 2
    with pytest.raises(NotFound):
        service.promote(cohort, 9)


def test_request_validation(tmp_path, clock):
    service = start(tmp_path, clock)
    join(service, clock, "pi-1")
    with pytest.raises(FleetRequestError):
        service.request_finetune(devices=["pi-1"], all_=True)
    with pytest.raises(FleetRequestError):
        service.request_finetune(cohort="nobody")
    outcome = service.request_finetune(devices=["pi-1", "ghost"])
    assert outcome["skipped"] == {"ghost": "unknown device"}
    again = service.request_finetune(devices=["pi-1"])
    assert again["rounds"] == [] and "under way" in again["skipped"]["pi-1"]


def test_task_names_fit_the_registry():
    assert task_name("Fan.Room:A") == "fan-room-a"
    assert task_name("...") == "default"


def test_a_round_closed_just_before_a_crash_is_recorded_on_restart(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1")
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    # The crash: the scheduler closed the round, the pipeline never heard of it.
    service.fleet.scheduler.tick()
    assert service.rounds()[0]["stage"] == "RUNNING"
    service.close()
    restarted = start(tmp_path, clock)
    restarted.tick()
    (round_view,) = restarted.rounds()
    assert round_view["stage"] == "STORED" and round_view["answered"] == ["pi-1"]
    assert [v["version"] for v in restarted.adapters()[0]["versions"]] == [1]


def test_a_device_busy_evaluating_still_starts_a_drift_round(tmp_path, clock):
    service = start(tmp_path, clock, drift_threshold=1.0, drift_margin=0.4)
    devices = join(service, clock, "pi-1", "pi-2")  # first heartbeats: drift 1.0, the baseline
    service.evaluate(all_=True)
    assert len(jobs_in(service.tick(), JobKind.EVALUATE)) == 2  # both now have a job running
    clock.advance(10)
    service.ingest([devices[0].heartbeat(drift=1.6)])  # its room went noisy
    service.tick()
    (started,) = service.rounds()
    assert started["trigger"] == "drift" and started["stage"] == "RUNNING"


def test_each_devices_personalised_adapters_are_kept_beside_the_fleet_one(tmp_path, clock):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    service.request_finetune(all_=True)
    finetune_all(service, devices, service.tick())
    kept = service.device_adapters("pi-1")
    assert len(kept) == 1 and kept[0]["samples"] > 0 and kept[0]["round_id"]
    assert kept[0]["file"] is None  # its own arrays, in its row of the state db
    meta = service.fleet.reports.get(kept[0]["job_id"])
    assert set(service.fleet.reports.result(meta).arrays) == {"A1", "B1", "A2", "B2", "A3", "B3"}
    with pytest.raises(NotFound):
        service.device_adapters("ghost")


def test_the_snapshot_counts_devices_behind_per_cohort_and_the_accuracy_of_what_each_runs(
    tmp_path, clock
):
    service = start(tmp_path, clock)
    devices = join(service, clock, "pi-1", "pi-2")
    other = SimDevice("har-1", clock, base_hash="b" * 64, cohort="har")
    service.ingest([other.presence(), other.heartbeat()])
    snapshot = service.metrics_report().snapshot
    fan = next(d.cohort for d in snapshot.devices if d.device_id == "pi-1")
    har = next(d.cohort for d in snapshot.devices if d.device_id == "har-1")
    assert snapshot.cohort_devices == {fan: 2, har: 1}
    assert snapshot.devices_behind == {fan: 0, har: 0}  # no version yet: nobody is behind
    assert {d.accuracy for d in snapshot.devices} == {None}  # measured nothing yet

    service.request_finetune(devices=["pi-1", "pi-2"])
    finetune_all(service, devices, service.tick())
    answer_canaries(service, devices, service.tick(), candidate=0.9, current=0.85)
    applies = jobs_in(service.tick(), JobKind.APPLY_ADAPTER)
    # v1 exists for fan: both its devices run something else (their own fine-tunes), har has none
    assert service.metrics_report().snapshot.devices_behind == {fan: 2, har: 0}

    by_name = {d.device_id: d for d in devices}
    measured = {"installed": True, "accuracy_candidate": 0.93, "accuracy_running": 0.8}
    (device, job), *_ = applies
    service.ingest([by_name[device].status(job.job_id, JobState.SUCCEEDED, measured)])
    snapshot = service.metrics_report().snapshot
    assert snapshot.devices_behind == {fan: 1, har: 0}
    accuracy = {d.device_id: d.accuracy for d in snapshot.devices}
    assert accuracy[device] == 0.93  # the version it installed, as it measured it
    assert accuracy["har-1"] is None

    # An evaluation of what a device runs moves its accuracy, not only a fine-tune.
    service.evaluate(devices=[device])
    (_, evaluation), *_ = jobs_in(service.tick(), JobKind.EVALUATE)
    service.ingest(
        [by_name[device].status(evaluation.job_id, JobState.SUCCEEDED, {"accuracy": 0.71})]
    )
    accuracy = {d.device_id: d.accuracy for d in service.metrics_report().snapshot.devices}
    assert accuracy[device] == 0.71


def test_fetches_repeated_while_the_answer_waits_in_the_outbox_queue_one_publication(
    tmp_path, clock
):
    """A device sending fetch after fetch (each a new seq: a small request in, a whole adapter
    out) gets one publication per hand-out, not one per request: the waiting one goes out after
    all of them anyway. Once handed out, the next fetch is answered again."""
    service = start(tmp_path, clock)
    (pi1,) = join(service, clock, "pi-1")
    promote_new_version(service, [pi1])
    service.tick()

    def publications() -> list[AdapterPublication]:
        return [o.message for o in service.tick() if isinstance(o.message, AdapterPublication)]

    service.ingest([pi1.fetch(1) for _ in range(20)])
    service.ingest([pi1.fetch(1) for _ in range(20)])
    assert [p.version for p in publications()] == [1]
    service.ingest([pi1.fetch(1)])
    assert [p.version for p in publications()] == [1]
