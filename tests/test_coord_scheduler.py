"""Fine-tune scheduler: triggers, limits, skips, timeouts, retries and rounds, on a manual clock."""

from __future__ import annotations

import pytest

from coordinator.clock import ManualClock
from coordinator.jobs import JobState, JobTable
from coordinator.registry import FleetRegistry
from coordinator.rounds import Round, RoundOutcome
from coordinator.scheduler import (
    Candidate,
    FineTuneScheduler,
    SchedulerPolicy,
    SkipReason,
    Trigger,
)
from coordinator.state_db import StateDB

HASH = "cd" * 32
COHORT = "har-cdcdcdcdcdcd"


class Fleet:
    """Registry + jobs + scheduler over one state dir; reopen() simulates a restart."""

    def __init__(self, tmp_path, policy: SchedulerPolicy, clock: ManualClock) -> None:
        self.tmp_path, self.policy, self.clock = tmp_path, policy, clock
        self.reopen()

    def reopen(self) -> None:
        db = StateDB.in_dir(self.tmp_path)
        self.registry = FleetRegistry(db, clock=self.clock)
        self.jobs = JobTable(db, clock=self.clock)
        self.scheduler = FineTuneScheduler(
            db, self.registry, self.jobs, policy=self.policy, clock=self.clock
        )

    def add(self, device: str, *, accuracy: float = 0.95, **heartbeat) -> None:
        self.registry.register(device, base_model_hash=HASH, task="har")
        self.registry.set_presence(device, True)
        self.registry.record_heartbeat(device, temperature_c=45.0, **heartbeat)
        self.registry.record_accuracy(device, accuracy)

    def heartbeat_all(self) -> None:
        for record in self.registry.devices():
            self.registry.record_heartbeat(record.device_id)

    def finish(self, job, state=JobState.SUCCEEDED) -> None:
        self.jobs.report_status(job.job_id, state, device_id=job.device_id)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start=7_200.0)


def make_fleet(tmp_path, clock, **policy) -> Fleet:
    return Fleet(tmp_path, SchedulerPolicy(**policy), clock)


def dispatched(result) -> dict[str, str]:
    return {job.device_id: job.trigger for job in result.dispatched}


def test_accuracy_below_threshold_triggers(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, accuracy_threshold=0.85)
    fleet.add("pi-low", accuracy=0.70)
    fleet.add("pi-ok", accuracy=0.90)
    assert dispatched(fleet.scheduler.tick()) == {"pi-low": Trigger.ACCURACY_BELOW}


def test_drop_since_last_finetune_triggers(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, accuracy_threshold=0.80, accuracy_drop_margin=0.05)
    for device in ("pi-dropped", "pi-steady"):
        fleet.add(device)
        fleet.registry.record_finetune(device, accuracy_before=0.7, accuracy_after=0.95)
    fleet.registry.record_accuracy("pi-dropped", 0.88)  # above 0.80, but 0.07 below 0.95
    fleet.registry.record_accuracy("pi-steady", 0.92)
    assert dispatched(fleet.scheduler.tick()) == {"pi-dropped": Trigger.ACCURACY_DROP}


def test_drift_triggers_and_cooldown_prevents_a_loop(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, drift_threshold=0.5, trigger_cooldown_s=600)
    fleet.add("pi-drift", drift_score=0.2)  # its own baseline
    assert fleet.scheduler.tick().dispatched == ()
    fleet.registry.record_heartbeat("pi-drift", drift_score=0.8)  # 0.6 above it, over 0.5
    (job,) = fleet.scheduler.tick().dispatched
    assert job.trigger == Trigger.DRIFT
    fleet.finish(job)
    clock.advance(300)
    fleet.heartbeat_all()
    assert fleet.scheduler.tick().dispatched == ()  # drift still high, but in cooldown
    clock.advance(300)
    fleet.heartbeat_all()
    assert dispatched(fleet.scheduler.tick()) == {"pi-drift": Trigger.DRIFT}


def test_drift_counts_from_the_last_finetune_not_from_the_base_model(tmp_path, clock):
    """An adapter does not move the inputs back: a device adapted to a noisy room keeps a high
    score, and must not be fine-tuned again until the score rises further."""
    fleet = make_fleet(
        tmp_path, clock, drift_threshold=2.0, drift_margin=0.5, trigger_cooldown_s=10
    )
    fleet.add("pi-noisy", drift_score=1.2)  # a quiet room: its baseline
    fleet.registry.record_heartbeat("pi-noisy", drift_score=2.4)
    (job,) = fleet.scheduler.tick().dispatched
    fleet.finish(job)
    fleet.registry.record_finetune("pi-noisy", accuracy_before=0.6, accuracy_after=0.99)
    assert fleet.registry.get("pi-noisy").drift_reference == 2.4
    clock.advance(60)
    fleet.registry.record_heartbeat("pi-noisy", drift_score=2.7)  # within 0.5 of 2.4
    assert fleet.scheduler.tick().dispatched == ()
    fleet.registry.record_heartbeat("pi-noisy", drift_score=3.1)  # a new shift
    assert dispatched(fleet.scheduler.tick()) == {"pi-noisy": Trigger.DRIFT}


def test_drift_is_measured_against_each_devices_own_baseline(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, drift_threshold=1.0, drift_margin=0.4)
    fleet.add("pi-8cm", drift_score=1.25)  # quiet, but its fan sits higher than the others
    fleet.add("pi-12cm", drift_score=0.95)
    fleet.registry.record_heartbeat("pi-8cm", drift_score=1.3)
    fleet.registry.record_heartbeat("pi-12cm", drift_score=1.5)  # the room went noisy
    assert dispatched(fleet.scheduler.tick()) == {"pi-12cm": Trigger.DRIFT}


def test_evaluations_do_not_hold_off_a_drift_trigger(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, drift_threshold=2.0, trigger_cooldown_s=10)
    fleet.add("pi-watched", drift_score=1.2)
    for _ in range(3):  # an operator asks for its accuracy every few seconds
        fleet.finish(fleet.jobs.create("pi-watched", timeout_s=30, kind="evaluate"))
        clock.advance(5)
    fleet.registry.record_heartbeat("pi-watched", drift_score=2.6)
    assert dispatched(fleet.scheduler.tick()) == {"pi-watched": Trigger.DRIFT}


def test_at_most_k_concurrent_jobs(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, max_concurrent_jobs=2)
    devices = [f"pi-{i}" for i in range(5)]
    for device in devices:
        fleet.add(device)
    assert fleet.scheduler.request(devices).accepted == tuple(devices)
    first = fleet.scheduler.tick()
    assert len(first.dispatched) == 2 and fleet.jobs.active_count() == 2
    assert list(first.skipped.values()) == [SkipReason.CONCURRENCY_LIMIT] * 3
    assert fleet.scheduler.tick().dispatched == ()  # still full
    fleet.finish(first.dispatched[0])
    second = fleet.scheduler.tick()
    assert len(second.dispatched) == 1 and fleet.jobs.active_count() == 2
    started = {j.device_id for j in first.dispatched + second.dispatched}
    assert started == {"pi-0", "pi-1", "pi-2"}  # requests are served in arrival order


def test_offline_hot_stale_and_energy_budget_are_skipped_with_reason(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, max_temperature_c=70.0, energy_budget_j=500.0)
    for device in ("pi-off", "pi-hot", "pi-hungry", "pi-quiet", "pi-ok"):
        fleet.add(device)
    clock.advance(91)  # past heartbeat_timeout_s: only pi-quiet stays silent
    for device in ("pi-off", "pi-hot", "pi-hungry", "pi-ok"):
        fleet.registry.record_heartbeat(device)
    fleet.registry.record_heartbeat("pi-hot", temperature_c=82.0)
    fleet.registry.record_heartbeat("pi-hungry", energy_j=1_000.0)
    fleet.registry.record_heartbeat("pi-hungry", energy_j=1_600.0)
    fleet.registry.set_presence("pi-off", False)  # its Last Will
    fleet.scheduler.request_all()
    result = fleet.scheduler.tick()
    assert dispatched(result) == {"pi-ok": Trigger.REQUEST}
    assert result.skipped == {
        "pi-off": SkipReason.OFFLINE,
        "pi-hot": SkipReason.TOO_HOT,
        "pi-hungry": SkipReason.ENERGY_BUDGET,
        "pi-quiet": SkipReason.HEARTBEAT_STALE,
    }
    assert fleet.registry.require("pi-hot").last_skip_reason == "too_hot"
    assert fleet.registry.require("pi-hot").last_skip_at == clock()


def test_hot_and_busy_devices_are_reachable_and_reachability_asks_the_job_table_nothing(
    tmp_path, clock
):
    fleet = make_fleet(tmp_path, clock, max_temperature_c=70.0)
    for device in ("pi-busy", "pi-hot", "pi-off"):
        fleet.add(device)
    fleet.registry.record_heartbeat("pi-hot", temperature_c=82.0)
    fleet.registry.set_presence("pi-off", False)
    fleet.jobs.create("pi-busy", timeout_s=60.0)
    now, records = clock(), {d: fleet.registry.get(d) for d in ("pi-busy", "pi-hot", "pi-off")}
    assert fleet.scheduler.skip_reason(records["pi-busy"], now) is SkipReason.BUSY
    fleet.jobs.active = None  # any question to the job table would raise from here on
    reasons = {d: fleet.scheduler.unreachable_reason(r, now) for d, r in records.items()}
    assert reasons == {"pi-busy": None, "pi-hot": None, "pi-off": SkipReason.OFFLINE}
    assert fleet.scheduler.unreachable_reason(None, now) is SkipReason.UNKNOWN_DEVICE


def test_a_dispatch_pass_reads_the_active_jobs_once_and_skips_the_busy_device(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, max_concurrent_jobs=10)
    for device in ("pi-1", "pi-2", "pi-3", "pi-busy"):
        fleet.add(device)
    fleet.jobs.create("pi-busy", timeout_s=60.0)
    fleet.scheduler.request_all()
    reads: list[str | None] = []
    active = fleet.jobs.active
    fleet.jobs.active = lambda device_id=None: (reads.append(device_id), active(device_id))[1]
    result = fleet.scheduler.tick()
    assert sorted(dispatched(result)) == ["pi-1", "pi-2", "pi-3"]  # one job each
    assert result.skipped == {"pi-busy": SkipReason.BUSY}
    assert reads == [None]  # the whole fleet's active jobs, once: none a device


def test_a_device_that_is_a_candidate_twice_in_one_pass_gets_one_job(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, max_concurrent_jobs=10)
    fleet.add("pi-1")
    twice = [Candidate("pi-1", Trigger.REQUEST), Candidate("pi-1", Trigger.DRIFT)]
    jobs, skipped = fleet.scheduler._dispatch(twice, clock())
    assert [job.device_id for job in jobs] == ["pi-1"]
    assert skipped == {"pi-1": SkipReason.BUSY}  # the pass's own job makes it busy


def test_a_device_that_just_came_online_is_not_stale_before_its_first_heartbeat(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock)
    fleet.registry.register("pi-new", base_model_hash=HASH, task="har")
    fleet.registry.set_presence("pi-new", True)  # retained `online`, no heartbeat yet
    fleet.scheduler.request_all()
    assert dispatched(fleet.scheduler.tick()) == {"pi-new": Trigger.REQUEST}


def test_unknown_devices_are_reported_not_queued(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock)
    fleet.add("pi-1")
    outcome = fleet.scheduler.request(["pi-1", "pi-typo"])
    assert outcome.accepted == ("pi-1",) and outcome.unknown == ("pi-typo",)


def test_timeout_then_bounded_retries(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, job_timeout_s=100, max_attempts=2)
    fleet.add("pi-1")
    fleet.scheduler.request(["pi-1"])
    (first,) = fleet.scheduler.tick().dispatched
    clock.advance(100)
    fleet.heartbeat_all()
    result = fleet.scheduler.tick()
    assert [(j.job_id, j.state) for j in result.timed_out] == [(first.job_id, JobState.TIMED_OUT)]
    (second,) = result.dispatched  # the retry goes out in the same tick
    assert (second.attempt, second.retry_of) == (2, first.job_id)
    fleet.finish(second, JobState.FAILED)
    clock.advance(10)
    fleet.heartbeat_all()
    assert fleet.scheduler.tick().dispatched == ()  # 2 of 2 attempts used
    assert len(fleet.jobs.active()) == 0


def test_pending_requests_survive_a_restart(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock)
    fleet.add("pi-1")
    fleet.registry.set_presence("pi-1", False)
    fleet.scheduler.request(["pi-1"])
    assert fleet.scheduler.tick().skipped == {"pi-1": SkipReason.OFFLINE}
    fleet.reopen()
    fleet.registry.set_presence("pi-1", True, at=clock() + 1)
    clock.advance(1)
    fleet.heartbeat_all()
    assert dispatched(fleet.scheduler.tick()) == {"pi-1": Trigger.REQUEST}


def test_requests_expire_after_their_ttl(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, request_ttl_s=300)
    fleet.add("pi-1")
    fleet.registry.set_presence("pi-1", False)
    fleet.scheduler.request(["pi-1"])
    clock.advance(300)
    result = fleet.scheduler.tick()
    assert [r.device_id for r in result.expired_requests] == ["pi-1"]
    assert result.skipped == {}


def test_round_completes_at_deadline_with_ratio_and_lists_failures(tmp_path, clock):
    fleet = make_fleet(
        tmp_path,
        clock,
        max_concurrent_jobs=5,
        job_timeout_s=900,
        round_deadline_s=600,
        min_completion_ratio=0.6,
    )
    devices = [f"pi-{i}" for i in range(5)]
    for device in devices:
        fleet.add(device)
    fleet.registry.set_presence("pi-4", False)  # dead: never gets a job
    rnd = fleet.scheduler.start_round(cohort=COHORT, round_id="round-1")
    assert rnd.device_ids == tuple(devices)
    jobs = {j.device_id: j for j in fleet.scheduler.tick().dispatched}
    assert set(jobs) == {"pi-0", "pi-1", "pi-2", "pi-3"}
    for device in ("pi-0", "pi-1", "pi-2"):
        fleet.finish(jobs[device])
    status = fleet.scheduler.round_status("round-1")
    assert status.outcome is RoundOutcome.RUNNING  # ratio reached, but pi-3 may still answer
    assert status.completion_ratio == pytest.approx(0.6)
    fleet.reopen()  # the round, its jobs and its members are on disk
    clock.advance(600)
    result = fleet.scheduler.tick()
    (closed,) = result.closed_rounds
    assert closed.outcome is RoundOutcome.COMPLETED
    assert closed.answered == ("pi-0", "pi-1", "pi-2")
    assert set(closed.failed) == {"pi-3", "pi-4"}
    assert "never started" in closed.failed["pi-4"] and "offline" in closed.failed["pi-4"]
    assert [j.device_id for j in result.canceled] == ["pi-3"]  # stop the straggler
    assert fleet.scheduler.tick().closed_rounds == ()  # closed once


def test_round_completes_early_when_everyone_answered(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, max_concurrent_jobs=4)
    for device in ("pi-a", "pi-b"):
        fleet.add(device)
    fleet.scheduler.start_round(["pi-a", "pi-b"], round_id="r")
    for job in fleet.scheduler.tick().dispatched:
        fleet.finish(job)
    (closed,) = fleet.scheduler.tick().closed_rounds
    assert closed.outcome is RoundOutcome.COMPLETED and closed.failed == {}


def test_round_fails_as_soon_as_the_ratio_is_out_of_reach(tmp_path, clock):
    fleet = make_fleet(
        tmp_path, clock, max_concurrent_jobs=4, max_attempts=1, min_completion_ratio=0.75
    )
    devices = ["pi-a", "pi-b", "pi-c", "pi-d"]
    for device in devices:
        fleet.add(device)
    fleet.scheduler.start_round(devices, round_id="r")
    jobs = fleet.scheduler.tick().dispatched
    fleet.finish(jobs[0])
    fleet.finish(jobs[1], JobState.FAILED)
    assert fleet.scheduler.round_status("r").outcome is RoundOutcome.RUNNING
    fleet.finish(jobs[2], JobState.REJECTED)  # 3 of 4 can no longer answer
    result = fleet.scheduler.tick()
    (closed,) = result.closed_rounds
    assert closed.outcome is RoundOutcome.FAILED
    assert closed.failed[jobs[1].device_id].startswith("FAILED")
    assert "round ended before it answered" in closed.failed[jobs[3].device_id]
    assert len(result.canceled) == 1


def test_round_retries_a_failed_member_while_open(tmp_path, clock):
    fleet = make_fleet(tmp_path, clock, max_attempts=2, min_completion_ratio=1.0)
    fleet.add("pi-a")
    fleet.scheduler.start_round(["pi-a"], round_id="r")
    (first,) = fleet.scheduler.tick().dispatched
    fleet.finish(first, JobState.FAILED)
    assert fleet.scheduler.round_status("r").pending == ("pi-a",)  # a retry is still due
    (second,) = fleet.scheduler.tick().dispatched
    assert second.round_id == "r" and second.attempt == 2
    fleet.finish(second)
    (closed,) = fleet.scheduler.tick().closed_rounds
    assert closed.outcome is RoundOutcome.COMPLETED and closed.answered == ("pi-a",)


def test_policy_is_validated():
    with pytest.raises(ValueError, match="max_concurrent_jobs"):
        SchedulerPolicy(max_concurrent_jobs=0)
    with pytest.raises(ValueError, match="min_completion_ratio"):
        SchedulerPolicy(min_completion_ratio=0.0)


def test_round_ratio_is_counted_in_devices():
    rnd = Round("r", tuple(f"pi-{i}" for i in range(10)), 0.0, 1.0, min_completion_ratio=0.7)
    assert rnd.answers_needed == 7
