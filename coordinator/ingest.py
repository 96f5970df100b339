"""Device messages into the fleet state: presence, heartbeats, job statuses, reports, fetches.

The bridge has already decoded, routed (sender = topic device), reassembled and de-duplicated
them; here each is applied idempotently (a QoS 1 re-delivery after a restart changes nothing),
and anything that cannot be applied is counted as rejected with a reason, never raised.
A fine-tune's report is its job's SUCCEEDED: the device sends no status after it (a SUCCEEDED
from an older agent, after the report, is a repeat and changes nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from coordinator.aggregation import AdapterShape
from coordinator.distribution import AdapterDistributor
from coordinator.fleet import Fleet, task_name
from coordinator.jobs import Job, JobError, JobState
from coordinator.observations import FinetuneReported
from coordinator.registry import LabelFree
from coordinator.reports import CheckedValues, ReportMeta, ReportRejected, check_adapter
from coordinator.scheduler import label_free_score
from shared.protocol import (
    Envelope,
    FetchRequest,
    Heartbeat,
    JobReason,
    JobStatus,
    Presence,
    PresenceState,
    Report,
)
from shared.protocol import JobState as WireJobState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    """A decoded device message and when the bridge received it (the coordinator's clock);
    a report's checks' verdict from the bridge (coordinator.reports.CheckedValues; None: not
    checked yet, the actor checks it)."""

    envelope: Envelope
    received_at: float
    checked: CheckedValues | None = None

    @property
    def device_id(self) -> str:
        return self.envelope.sender  # the bridge checked it is the topic's device


class MessageHandler:
    def __init__(self, fleet: Fleet, distributor: AdapterDistributor) -> None:
        self._fleet = fleet
        self._distributor = distributor

    def handle(self, received: Received) -> None:
        message, device, at = received.envelope.message, received.device_id, received.received_at
        match message:
            case Presence():
                self._presence(device, message, at)
            case Heartbeat():
                self._heartbeat(device, message, at)
            case JobStatus():
                self._job_status(device, message)
            case Report():
                self._report(device, message, at, received.checked)
            case FetchRequest():
                self._distributor.answer_fetch(device, message.adapter_version)
            case _:
                self._fleet.reject("unexpected_kind", f"{type(message).__name__} from {device}")

    def _presence(self, device: str, message: Presence, at: float) -> None:
        f = self._fleet
        if message.state is PresenceState.ONLINE:
            before = f.registry.get(device)
            record = f.registry.register(
                device,
                base_model_hash=message.base_model_hash,
                task=task_name(message.cohort),
                train_samples=message.train_samples,
                holdout_samples=message.holdout_samples,
            )
            if before is None or before.cohort != record.cohort:
                log.info("device %s joined cohort %s", device, record.cohort)
                self._distributor.on_registered(record)
        f.registry.set_presence(device, message.state is PresenceState.ONLINE, at=at)
        if message.state is PresenceState.ONLINE:
            # A new connection (a repeated presence is dropped by coordinator.seen's memo; the
            # retained one after a restart or past the memo asks once more, harmlessly), after
            # the device subscribed: what a crashed broker lost can be asked for again now.
            asked = f.reask(device)
            if asked:
                log.info("%s is online: its %d open jobs asked again", device, asked)

    def _heartbeat(self, device: str, beat: Heartbeat, at: float) -> None:
        signature = None if beat.signature is None else beat.signature.astype("<f4").tobytes()
        origin = None if beat.adapter_origin is None else beat.adapter_origin.value
        record = self._fleet.registry.record_heartbeat(
            device,
            at=at,
            power_w=beat.power_w,
            energy_j=beat.energy_j_total,
            spool_depth=beat.spool_depth,
            temperature_c=beat.temperature_c,
            drift_score=beat.drift_score,
            adapter_version=beat.adapter_version,
            clock_offset_s=beat.clock_offset_s,
            label_free=LabelFree(
                confidence_score=beat.confidence_score,
                feature_score=beat.feature_score,
                signature=signature,
                signature_rows=beat.signature_rows,
                adapter_origin=origin,
            ),
        )
        policy = self._fleet.config.policy
        score = label_free_score(record, policy.label_free_signal)
        threshold = policy.label_free_threshold
        above = score is not None and threshold is not None and score > threshold
        self._fleet.registry.note_label_free(device, above, at)

    def _job_status(self, device: str, status: JobStatus) -> None:
        job = self._owned_job(device, status.job_id)
        if job is None:
            return
        if status.state is WireJobState.REJECTED and status.reason_code is JobReason.DUPLICATE:
            return  # a re-delivered command: the first delivery's statuses tell its fate
        self._ended(device, job, JobState(status.state.value.upper()), status)

    def _ended(self, device: str, job: Job, state: JobState, status: JobStatus | None) -> None:
        """The device moved its job on (`status`: its JobStatus; None: its report said it)."""
        f = self._fleet
        why = None if status is None else _why(status)
        try:
            updated = f.jobs.report_status(
                job.job_id, state, device_id=device, detail=why, current=job
            )
        except JobError as err:
            f.reject("stale_status", str(err))  # e.g. a result after the job timed out
            return
        if updated.state is job.state:
            return
        f.transitioned(updated)
        if updated.is_terminal:
            f.registry.record_answer(device)
            self._distributor.on_job_finished(updated, status)

    def _report(
        self, device: str, report: Report, at: float, checked: CheckedValues | None
    ) -> None:
        f = self._fleet
        job = self._owned_job(device, report.job_id)
        record = f.registry.get(device)
        if job is None or record is None:
            return
        if job.kind != "finetune" or record.cohort is None:
            f.reject("unexpected_report", f"report from {device} for {job.kind} job {job.job_id}")
            return
        if not f.seen.first_report(device, job.job_id):
            # This job's report was handled already (applied, refused or late): this one came as
            # a new message (a new seq passes first_time), so it would record the fine-tune and
            # its energy twice and put back "runs its own adapter" over what happened since. An
            # agent never does that (a kept result goes again unchanged); a device replaying a
            # job id does.
            f.reject("duplicate", f"a second report from {device} for job {job.job_id}")
            return
        m = report.metrics
        # What the device did, whatever becomes of its adapter: it spent the energy, and it runs
        # the new adapter only if that was not worse on its hold-out.
        f.registry.record_finetune(
            device, accuracy_before=m.accuracy_before, accuracy_after=m.accuracy_after, at=at
        )
        running = m.accuracy_running if m.accuracy_running is not None else m.accuracy_before
        if m.installed or (m.installed is None and m.accuracy_after >= running):
            why = f"its own fine-tune ({job.job_id[:8]}): {m.accuracy_after:.3f} against "
            f.registry.set_running(
                device, version=None, origin="personal", reason=f"{why}{running:.3f} before"
            )
        else:  # the device keeps what it ran
            f.registry.record_accuracy(device, running, at=at)
        f.events.record(FinetuneReported(record.cohort, m.joules, m.finetune_seconds))
        if job.is_terminal and job.state is not JobState.SUCCEEDED:
            f.reject("stale_report", f"report for job {job.job_id}, which is {job.state}")
            return
        try:
            shape = self._check(device, report, record.base_model_hash, record.cohort, checked)
        except ReportRejected as err:
            self._refuse(job, device, str(err))
            return
        meta = ReportMeta(
            job_id=job.job_id,
            device_id=device,
            round_id=job.round_id,
            cohort=record.cohort,
            base_model_hash=m.base_model_hash,
            samples=m.samples,
            shape=shape,
            parent_adapter_version=report.parent_adapter_version,
            received_at=at,
            accuracy_before=m.accuracy_before,
            loss_before=m.loss_before,
        )
        f.reports.save(meta, report.adapter, checked_on_receipt=True)  # _check passed
        if job.is_active:
            self._ended(device, job, JobState.SUCCEEDED, None)

    def _check(
        self,
        device: str,
        report: Report,
        base_hash: str | None,
        cohort: str,
        checked: CheckedValues | None,
    ) -> AdapterShape:
        reported = report.metrics.base_model_hash
        if reported != base_hash:
            raise ReportRejected(
                f"device {device}: report for base model {reported[:12]}, "
                f"its presence says {(base_hash or '?')[:12]}"
            )
        expected = self._fleet.reports.cohort_shape(cohort)
        return check_adapter(device, report.adapter, report.metrics.samples, expected, checked)

    def _refuse(self, job: Job, device: str, reason: str) -> None:
        f = self._fleet
        f.reject("invalid_report", reason)
        if job.round_id is not None:  # failed for this device, not for its round
            f.rounds.excuse(job.round_id, device)
        if job.is_active:
            failed = f.jobs.report_status(
                job.job_id, JobState.FAILED, device_id=device, detail=f"report refused: {reason}"
            )
            f.transitioned(failed)

    def _owned_job(self, device: str, job_id: str) -> Job | None:
        f = self._fleet
        job = f.jobs.get(job_id)
        if job is None:
            f.reject("unknown_job", f"{device} reported on unknown job {job_id}")
        elif job.device_id != device:
            f.reject("not_owner", f"{device} reported on {job.device_id}'s job {job_id}")
            return None
        return job


def _why(status: JobStatus) -> str | None:
    code = status.reason_code.value if status.reason_code else None
    if code and status.reason:
        return f"{code}: {status.reason}"
    return code or status.reason


# A device's last word on a job within one batch: FAILED or SUCCEEDED (or a report, which is a
# fine-tune's SUCCEEDED) after IN_PROGRESS.
_FOLDING = frozenset({WireJobState.SUCCEEDED, WireJobState.FAILED})


def superseded(batch: Sequence[Received]) -> frozenset[int]:
    """Positions of IN_PROGRESS statuses whose job ends (SUCCEEDED, FAILED or its report, from
    the same device) later in the same batch. Applying only the end is what the job table allows
    anyway (QUEUED may end directly: an IN_PROGRESS can be lost) and saves a transition per job
    for devices that finish within a batch; the folded status is still remembered as seen."""
    started: dict[tuple[str, str], int] = {}
    folded = set()
    for index, received in enumerate(batch):
        message = received.envelope.message
        if not isinstance(message, JobStatus | Report):
            continue
        key = (received.device_id, message.job_id)
        if isinstance(message, JobStatus) and message.state is WireJobState.IN_PROGRESS:
            started[key] = index
        elif (isinstance(message, Report) or message.state in _FOLDING) and key in started:
            folded.add(started.pop(key))
    return frozenset(folded)
