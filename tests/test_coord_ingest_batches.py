"""Batched ingest: an IN_PROGRESS that its job's end follows in the same batch is folded (seen,
not applied), and nothing else is."""

from __future__ import annotations

import pytest

from coordinator.clock import ManualClock
from coordinator.ingest import superseded
from coordinator.observations import JobTransition, MessageRejected
from coordinator.service import FleetService
from shared.protocol import JobKind, JobReason, JobState
from tests.coord_fleet_helpers import SimDevice, fail_handling_for, jobs_in, make_config


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def one_job(tmp_path, clock):
    service = FleetService(make_config(tmp_path), clock=clock)
    pi1, pi2 = SimDevice("pi-1", clock), SimDevice("pi-2", clock)
    service.ingest([pi1.presence(), pi1.heartbeat(), pi2.presence(), pi2.heartbeat()])
    service.request_finetune(devices=["pi-1"])
    ((_, job),) = jobs_in(service.tick(), JobKind.FINETUNE)
    service.metrics_report()  # drain the events so far
    return service, pi1, pi2, job


def transitions(service: FleetService) -> list[str]:
    return [e.state for e in service.metrics_report().events if isinstance(e, JobTransition)]


def test_an_in_progress_ended_in_the_same_batch_is_folded_but_remembered(tmp_path, clock):
    service, pi1, _, job = one_job(tmp_path, clock)
    started = pi1.status(job.job_id, JobState.IN_PROGRESS)
    batch = [started, pi1.report(job.job_id), pi1.status(job.job_id, JobState.SUCCEEDED)]
    assert service.ingest(batch) == 3
    assert service.jobs()[0]["state"] == "SUCCEEDED"
    assert transitions(service) == ["SUCCEEDED"]  # QUEUED -> SUCCEEDED, no IN_PROGRESS step
    assert service.ingest([started]) == 0  # a redelivery of the folded status is a repeat
    duplicates = [e for e in service.metrics_report().events if isinstance(e, MessageRejected)]
    assert [e.reason for e in duplicates] == ["duplicate"]


def test_an_in_progress_alone_in_its_batch_is_applied(tmp_path, clock):
    service, pi1, _, job = one_job(tmp_path, clock)
    service.ingest([pi1.status(job.job_id, JobState.IN_PROGRESS)])
    assert service.jobs()[0]["state"] == "IN_PROGRESS"
    service.ingest([pi1.report(job.job_id), pi1.status(job.job_id, JobState.SUCCEEDED)])
    assert transitions(service) == ["IN_PROGRESS", "SUCCEEDED"]


def test_only_the_same_devices_end_of_the_same_job_folds_a_status(clock):
    pi1, pi2 = SimDevice("pi-1", clock), SimDevice("pi-2", clock)
    batch = [
        pi1.status("job-a", JobState.IN_PROGRESS),  # 0: ended below by pi-1
        pi1.status("job-b", JobState.IN_PROGRESS),  # 1: job-b ends from another device
        pi2.status("job-b", JobState.SUCCEEDED),
        pi1.status("job-a", JobState.FAILED),
        pi1.status("job-c", JobState.IN_PROGRESS),  # 4: rejected, not ended
        pi1.status("job-c", JobState.REJECTED, reason_code=JobReason.BUSY),
        pi1.status("job-d", JobState.SUCCEEDED),  # an end before its start folds nothing
        pi1.status("job-d", JobState.IN_PROGRESS),
    ]
    assert superseded(batch) == {0}


def test_a_message_that_raises_is_refused_alone_and_the_batch_counts_once(
    tmp_path, clock, monkeypatch
):
    """The batch goes in without a savepoint per message; when one raises, it is applied again
    message by message: the others are kept, their events counted once, and a heartbeat of
    the failed pass is not taken for a repeat."""
    service, pi1, pi2, job = one_job(tmp_path, clock)
    fail_handling_for(monkeypatch, service, "pi-2")
    clock.advance(5.0)
    beat = pi1.heartbeat()
    batch = [beat, pi1.report(job.job_id), pi2.heartbeat()]  # the failure comes last
    assert service.ingest(batch) == 2
    assert service.jobs()[0]["state"] == "SUCCEEDED"
    assert service.device("pi-1")["last_heartbeat_at"] == beat.received_at
    events = service.metrics_report().events
    assert transitions_in(events) == ["SUCCEEDED"]
    assert [e.reason for e in events if isinstance(e, MessageRejected)] == ["internal_error"]
    assert service.ingest([beat]) == 0  # applied once, remembered once


def transitions_in(events) -> list[str]:
    return [e.state for e in events if isinstance(e, JobTransition)]


def test_a_report_alone_ends_its_job_succeeded_and_folds_an_in_progress_before_it(tmp_path, clock):
    service, pi1, _, job = one_job(tmp_path, clock)
    started = pi1.status(job.job_id, JobState.IN_PROGRESS)
    assert service.ingest([started, pi1.report(job.job_id)]) == 2
    assert service.jobs()[0]["state"] == "SUCCEEDED"
    assert transitions(service) == ["SUCCEEDED"]  # the report is the end: no status needed
    assert superseded([started, pi1.report(job.job_id)]) == {0}
    # an older agent's SUCCEEDED after its report changes nothing and is no error
    service.ingest([pi1.status(job.job_id, JobState.SUCCEEDED)])
    assert transitions(service) == []
    rejected = [e for e in service.metrics_report().events if isinstance(e, MessageRejected)]
    assert rejected == []


def test_a_finetunes_end_does_not_look_for_it_among_the_command_jobs(tmp_path, clock):
    """Only evaluations and adapter applies are in the command log (CommandLog.add refuses the
    rest): a fine-tune's end is not looked up there, one statement less a device a round."""
    service, pi1, _, job = one_job(tmp_path, clock)
    statements: list[str] = []
    service.fleet.db.trace(statements.append)
    assert service.ingest([pi1.report(job.job_id), pi1.status(job.job_id, JobState.SUCCEEDED)])
    service.fleet.db.trace(None)
    assert service.jobs()[0]["state"] == "SUCCEEDED"
    assert any("INSERT OR IGNORE INTO fit_reports" in sql for sql in statements)  # traced
    assert not [sql for sql in statements if "command_jobs" in sql]
