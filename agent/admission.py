"""Which jobs a device takes on arrival: the rules shared by the agent and the load generator."""

from __future__ import annotations

from collections.abc import Container

from shared.protocol.checks import Scalar
from shared.protocol.enums import JobKind, JobReason, JobState
from shared.protocol.messages import Job, JobStatus


def admission_check(
    job: Job,
    *,
    runnable: Container[JobKind],
    now: float,
    previous_state: JobState | None,
    base_model_hash: str,
    queued: int,
    max_queued: int,
) -> JobStatus | None:
    """The REJECTED status a job gets on arrival (unknown kind, expired, seen before, for another
    base model, queue full), or None to queue it. Shared by the agent and the load generator."""

    def rejected(code: JobReason, why: str, **detail: Scalar) -> JobStatus:
        return JobStatus(job.job_id, JobState.REJECTED, reason_code=code, reason=why, detail=detail)

    if job.kind not in runnable and job.kind is not JobKind.CANCEL:
        return rejected(JobReason.UNKNOWN_KIND, f"this agent does not run {job.kind} jobs")
    if job.is_expired(now):
        return rejected(JobReason.EXPIRED, f"job expired at {job.expires_at:.0f}")
    if previous_state is not None:
        # A QoS 1 re-delivery or a re-sent job: say what became of the first one.
        return rejected(
            JobReason.DUPLICATE, "job id seen before", previous_state=previous_state.value
        )
    if job.base_model_hash is not None and job.base_model_hash != base_model_hash:
        return rejected(
            JobReason.BASE_MODEL_MISMATCH,
            f"job is for base model {job.base_model_hash}, device runs {base_model_hash}",
        )
    if job.kind is not JobKind.CANCEL and queued >= max_queued:
        return rejected(JobReason.BUSY, f"{queued} jobs already queued")
    return None
