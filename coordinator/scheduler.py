"""Fine-tune scheduling: pure decisions over the registry, the job table and a clock.

tick() is the one entry point the coordinator loop calls (every few seconds): it times out
overdue jobs, closes finished rounds, then starts jobs (retries first, then operator requests and
round members, then automatic triggers) while at most max_concurrent_jobs are active, skipping
devices that are offline, silent, too hot, over their energy budget or busy, and recording why.
It returns what the bridge must send; it never sends anything itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from coordinator.clock import Clock, system_clock
from coordinator.jobs import Job, JobTable
from coordinator.registry import DeviceRecord, FleetRegistry
from coordinator.request_queue import PendingRequest, RequestQueue
from coordinator.rounds import Round, RoundOutcome, RoundStatus, RoundTable, evaluate_round
from coordinator.state_db import StateDB

# How long a round that could close waits for the report of a device whose job succeeded
# (a partitioned coordinator only; see FineTuneScheduler._awaiting_reports).
REPORT_GRACE_S = 10.0


class Trigger(StrEnum):
    RETRY = "retry"
    ROUND = "round"
    REQUEST = "request"
    ACCURACY_BELOW = "accuracy_below"
    ACCURACY_DROP = "accuracy_drop"
    DRIFT = "drift"
    LABEL_FREE_DRIFT = "label_free_drift"


class LabelFreeSignal(StrEnum):
    """Which calibrated heartbeat score a label-free drift trigger reads."""

    CONFIDENCE = "confidence"  # mean 1 − max softmax, with the adapter the device runs
    FEATURE = "feature"  # Mahalanobis distance on the last hidden layer
    EITHER = "either"  # the larger of the two


class SkipReason(StrEnum):
    UNKNOWN_DEVICE = "unknown_device"
    OFFLINE = "offline"
    HEARTBEAT_STALE = "heartbeat_stale"
    TOO_HOT = "too_hot"
    ENERGY_BUDGET = "energy_budget"
    BUSY = "busy"
    QUARANTINED = "quarantined"  # let too many jobs time out in a row: left alone for a while
    CONCURRENCY_LIMIT = "concurrency_limit"


@dataclass(frozen=True)
class SchedulerPolicy:
    """Every knob of the fine-tune policy. None switches a trigger or a limit off."""

    max_concurrent_jobs: int = 2
    # Automatic triggers (accuracies are fractions in [0, 1]).
    accuracy_threshold: float | None = 0.85
    accuracy_drop_margin: float | None = 0.05  # below the accuracy right after the last fine-tune
    drift_threshold: float | None = 0.5
    # ...and more than this above the device's own reference (first score, or at its last
    # fine-tune).
    drift_margin: float = 0.5
    # The calibrated label-free scores of the heartbeat: 1.0 is the threshold calibrated for
    # the base model on its own in-distribution data. A device fires when its score is over
    # this, and (after a run) more than label_free_margin over its score when the run began.
    label_free_threshold: float | None = 1.0
    # The confidence score separates harmful drift best (HAR AUROC 0.968, every base model
    # >= 0.912; the max of both 0.917: docs/benchmarks.md, "Label-free drift").
    label_free_signal: LabelFreeSignal = LabelFreeSignal.CONFIDENCE
    label_free_margin: float = 0.5
    # ...continuously for this long: a drift that lasts, not a window's blip (and signatures
    # that show the drift when the run clusters by them)
    label_free_persistence_s: float = 30.0
    # No automatic job for a device that had any job created this recently: a device whose
    # accuracy stays low after fine-tuning must not be fine-tuned in a loop.
    trigger_cooldown_s: float = 1800.0
    # Eligibility.
    heartbeat_timeout_s: float = 90.0
    max_temperature_c: float | None = 70.0
    energy_budget_j: float | None = None  # per FleetRegistry.energy_period_s
    # Jobs.
    job_timeout_s: float = 600.0
    max_attempts: int = 3
    quarantine_after: int = 3  # jobs timed out in a row
    quarantine_s: float = 900.0
    request_ttl_s: float = 3600.0  # how long an unserved request (or a retry) stays wanted
    # Rounds.
    round_deadline_s: float = 900.0
    min_completion_ratio: float = 0.8

    def __post_init__(self) -> None:
        if self.max_concurrent_jobs < 1:
            raise ValueError("max_concurrent_jobs must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.quarantine_after < 1 or not self.quarantine_s > 0:
            raise ValueError("quarantine_after must be >= 1 and quarantine_s > 0")
        if not 0.0 < self.min_completion_ratio <= 1.0:
            raise ValueError("min_completion_ratio must be in (0, 1]")
        positive = ("heartbeat_timeout_s", "job_timeout_s", "request_ttl_s", "round_deadline_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.trigger_cooldown_s < 0:
            raise ValueError("trigger_cooldown_s must be >= 0")


@dataclass(frozen=True)
class Candidate:
    device_id: str
    trigger: Trigger
    round_id: str | None = None
    retry_of: Job | None = None


@dataclass(frozen=True)
class RequestOutcome:
    accepted: tuple[str, ...]
    unknown: tuple[str, ...]


@dataclass(frozen=True)
class TickResult:
    dispatched: tuple[Job, ...] = ()  # new jobs, first attempts and retries: send them
    timed_out: tuple[Job, ...] = ()
    canceled: tuple[Job, ...] = ()  # jobs of rounds that closed: tell their devices to stop
    skipped: Mapping[str, SkipReason] = field(default_factory=dict)
    expired_requests: tuple[PendingRequest, ...] = ()
    closed_rounds: tuple[RoundStatus, ...] = ()  # aggregate the answered devices of these


class FineTuneScheduler:
    def __init__(
        self,
        db: StateDB,
        registry: FleetRegistry,
        jobs: JobTable,
        *,
        policy: SchedulerPolicy | None = None,
        clock: Clock = system_clock,
        reported: Callable[[str], set[str]] | None = None,
    ) -> None:
        self.policy = policy or SchedulerPolicy()
        # round id -> devices whose report is stored; given, a round that could close waits
        # (REPORT_GRACE_S at most) for the reports of devices whose job already succeeded
        self._reported = reported
        self._registry = registry
        self._jobs = jobs
        self._rounds = RoundTable(db)
        self._requests = RequestQueue(db)
        self._clock = clock

    # ---- operator requests

    def request(self, device_ids: Iterable[str]) -> RequestOutcome:
        """Fine-tune these devices as soon as they are eligible and a slot is free."""
        now = self._clock()
        accepted, unknown = [], []
        for device in device_ids:
            if self._registry.get(device) is None:
                unknown.append(device)
                continue
            expires = now + self.policy.request_ttl_s
            self._requests.add(PendingRequest(device, Trigger.REQUEST, now, expires))
            accepted.append(device)
        return RequestOutcome(tuple(accepted), tuple(unknown))

    def request_cohort(self, cohort: str) -> RequestOutcome:
        return self.request(r.device_id for r in self._registry.devices(cohort))

    def request_all(self) -> RequestOutcome:
        return self.request(r.device_id for r in self._registry.devices())

    def start_round(
        self,
        device_ids: Iterable[str] | None = None,
        *,
        cohort: str | None = None,
        round_id: str | None = None,
    ) -> Round:
        """A round over the given devices or a whole cohort; its jobs start on the next ticks."""
        if (device_ids is None) == (cohort is None):
            raise ValueError("give either device_ids or cohort")
        if device_ids is None:
            device_ids = [r.device_id for r in self._registry.devices(cohort)]
        devices = tuple(device_ids)
        unknown = [d for d in devices if self._registry.get(d) is None]
        if unknown:
            raise ValueError(f"unknown devices for the round: {unknown}")
        now = self._clock()
        rnd = Round(
            round_id=round_id or uuid.uuid4().hex,
            device_ids=devices,
            started_at=now,
            deadline=now + self.policy.round_deadline_s,
            min_completion_ratio=self.policy.min_completion_ratio,
            cohort=cohort,
        )
        self._rounds.add(rnd)
        self._requests.add_many(
            PendingRequest(device, Trigger.ROUND, now, rnd.deadline, rnd.round_id)
            for device in devices
        )
        return rnd

    def round_status(self, round_id: str) -> RoundStatus:
        rnd = self._rounds.get(round_id)
        if rnd is None:
            raise KeyError(f"unknown round {round_id}")
        return self._evaluate(rnd, self._clock())

    # ---- the periodic step

    def tick(self) -> TickResult:
        now = self._clock()
        timed_out = self._jobs.expire_overdue()
        closed_rounds, canceled = self._close_finished_rounds(now)
        expired = self._requests.drop_expired(now)
        dispatched, skipped = self._dispatch(self._candidates(now), now)
        return TickResult(
            dispatched=tuple(dispatched),
            timed_out=tuple(timed_out),
            canceled=tuple(canceled),
            skipped=skipped,
            expired_requests=tuple(expired),
            closed_rounds=tuple(closed_rounds),
        )

    def dispatch_now(self) -> TickResult:
        """Only the dispatching part of tick(): jobs for rounds started since (no timeouts,
        no closing, so nothing of those is lost between two ticks)."""
        dispatched, skipped = self._dispatch(self._candidates(self._clock()), self._clock())
        return TickResult(dispatched=tuple(dispatched), skipped=skipped)

    def unreachable_reason(self, record: DeviceRecord | None, now: float) -> SkipReason | None:
        """Why this device cannot be reached now: unknown, offline, silent or quarantined (None:
        it can). From the record alone: it runs for every device a step looks at, so it asks
        the job table nothing (a device that is hot or busy is reachable, and may clear soon)."""
        if record is None:
            return SkipReason.UNKNOWN_DEVICE
        if not record.online:
            return SkipReason.OFFLINE
        # The `online` presence is itself a sign of life: a device that just connected is not
        # stale before its first heartbeat.
        seen = max(record.last_heartbeat_at or 0.0, record.presence_since or 0.0)
        if now - seen > self.policy.heartbeat_timeout_s:
            return SkipReason.HEARTBEAT_STALE
        if record.quarantined_until is not None and now < record.quarantined_until:
            return SkipReason.QUARANTINED
        return None

    def skip_reason(
        self, record: DeviceRecord | None, now: float, busy: Container[str] | None = None
    ) -> SkipReason | None:
        """Why this device may not start a fine-tune now (None: it may). `busy`: the devices
        with an active job, read once for a pass (else this device's are read here)."""
        unreachable = self.unreachable_reason(record, now)
        if unreachable is not None or record is None:
            return unreachable
        policy = self.policy
        if _above(record.temperature_c, policy.max_temperature_c):
            return SkipReason.TOO_HOT
        budget = policy.energy_budget_j
        if budget is not None and self._registry.energy_used_this_period(record) >= budget:
            return SkipReason.ENERGY_BUDGET
        if self._jobs.is_busy(record.device_id, busy):
            return SkipReason.BUSY
        return None

    def automatic_trigger(self, record: DeviceRecord, now: float) -> Trigger | None:
        """Which automatic trigger fires for this device, if any (cooldown and busy excluded)."""
        trigger = self._fired(record, now)
        if trigger is None:  # the record alone says no: no query (this runs for every device)
            return None
        # only fine-tunes count: an operator's evaluations must not keep a device in cooldown
        latest = self._jobs.latest_for_device(record.device_id, kind="finetune")
        if latest is not None and (
            latest.is_active or now - latest.created_at < self.policy.trigger_cooldown_s
        ):
            return None
        return trigger

    def _fired(self, record: DeviceRecord, now: float) -> Trigger | None:
        policy = self.policy
        if _below(record.accuracy, policy.accuracy_threshold):
            return Trigger.ACCURACY_BELOW
        if _above(_drop_since_last_finetune(record), policy.accuracy_drop_margin):
            return Trigger.ACCURACY_DROP
        if _drifted(record, policy):
            return Trigger.DRIFT
        if _label_free_drifted(record, policy, now):
            return Trigger.LABEL_FREE_DRIFT
        return None

    # ---- internals

    def _candidates(self, now: float) -> list[Candidate]:
        """Retries first (already promised), then requests in arrival order, then automatic
        triggers, worst accuracy first; one candidate per device."""
        candidates: dict[str, Candidate] = {}
        for job in self._jobs.retry_candidates(updated_since=now - self.policy.request_ttl_s):
            if job.round_id is None or self._may_retry_in(job.round_id, job.device_id):
                candidates.setdefault(
                    job.device_id, Candidate(job.device_id, Trigger.RETRY, job.round_id, job)
                )
        for request in self._requests.pending():
            candidate = Candidate(request.device_id, Trigger(request.trigger), request.round_id)
            candidates.setdefault(request.device_id, candidate)
        automatic = []
        for record in self._registry.devices() if self._triggers_on() else ():
            if record.device_id in candidates:
                continue
            trigger = self.automatic_trigger(record, now)
            if trigger is not None:
                worst_first = record.accuracy if record.accuracy is not None else 1.0
                automatic.append((worst_first, record.device_id, trigger))
        for _, device, trigger in sorted(automatic):
            candidates[device] = Candidate(device, trigger)
        return list(candidates.values())

    def _triggers_on(self) -> bool:
        """False when every automatic trigger is switched off: no device could fire one, so
        the whole-fleet scan is skipped."""
        p = self.policy
        limits = (p.accuracy_threshold, p.accuracy_drop_margin, p.drift_threshold,
                  p.label_free_threshold)  # fmt: skip
        return any(limit is not None for limit in limits)

    def _dispatch(
        self, candidates: list[Candidate], now: float
    ) -> tuple[list[Job], dict[str, SkipReason]]:
        if not candidates:  # most ticks: no need to count the slots (a look-up per job)
            return [], {}
        active = self._jobs.active()
        capacity = self.policy.max_concurrent_jobs - self._slots_taken(active, now)
        busy = {job.device_id for job in active}  # one read a pass, not one a candidate
        dispatched: list[Job] = []
        skipped: dict[str, SkipReason] = {}
        for candidate in candidates:
            record = self._registry.get(candidate.device_id)
            reason = self.skip_reason(record, now, busy)
            if reason is None and capacity <= 0:
                reason = SkipReason.CONCURRENCY_LIMIT
            if reason is not None:
                skipped[candidate.device_id] = reason
                self._registry.record_skip(candidate.device_id, reason.value, at=now)
                continue
            dispatched.append(self._start_job(candidate))
            busy.add(candidate.device_id)  # a device that is a candidate twice gets one job
            capacity -= 1
        return dispatched, skipped

    def _slots_taken(self, active: Sequence[Job], now: float) -> int:
        """Fine-tunes under way on devices that are still there. A device that went silent
        holds no slot of the fleet's (only its own: it stays BUSY until its job times out),
        and quick commands (evaluate, apply) never count against training."""
        taken = 0
        for job in active:
            if job.kind != "finetune":
                continue
            record = self._registry.get(job.device_id)
            if record is not None and record.online and not self._stale(record, now):
                taken += 1
        return taken

    def _stale(self, record: DeviceRecord, now: float) -> bool:
        seen = max(record.last_heartbeat_at or 0.0, record.presence_since or 0.0)
        return now - seen > self.policy.heartbeat_timeout_s

    def _start_job(self, candidate: Candidate) -> Job:
        if candidate.retry_of is not None:
            job = self._jobs.retry(candidate.retry_of.job_id)
        else:
            job = self._jobs.create(
                candidate.device_id,
                timeout_s=self.policy.job_timeout_s,
                max_attempts=self.policy.max_attempts,
                round_id=candidate.round_id,
                trigger=candidate.trigger.value,
            )
        # Whatever started the job for this device and round also serves its pending request.
        self._requests.remove(candidate.device_id, candidate.round_id)
        return job

    def _close_finished_rounds(self, now: float) -> tuple[list[RoundStatus], list[Job]]:
        closed, canceled = [], []
        for rnd in self._rounds.open_rounds():
            if self._surely_running(rnd, now):
                continue
            status = self._evaluate(rnd, now)
            if not status.is_over or self._awaiting_reports(rnd, status, now):
                continue
            self._rounds.close(rnd.round_id, status.outcome, now)
            self._requests.drop_round(rnd.round_id)
            for job in self._jobs.for_round(rnd.round_id):
                if job.is_active:
                    canceled.append(
                        self._jobs.cancel(job.job_id, f"round {status.outcome.lower()}")
                    )
            closed.append(status)
        return closed, canceled

    def _awaiting_reports(self, rnd: Round, status: RoundStatus, now: float) -> bool:
        """A device answered (its job SUCCEEDED) but its report is not in yet. A partitioned
        coordinator's ingests share the device messages, so the report and the job's end can
        reach the owner in either order; closing now would aggregate without that report."""
        if self._reported is None or now >= rnd.deadline or not status.answered:
            return False
        missing = set(status.answered) - self._reported(rnd.round_id)
        if not missing:
            return False
        latest = self._jobs.latest_attempts(rnd.round_id)
        return any(now < latest[d].updated_at + REPORT_GRACE_S for d in missing if d in latest)

    def _surely_running(self, rnd: Round, now: float) -> bool:
        """A count-only check that spares the full evaluation (every job of the round read)
        on ticks that cannot close the round: before the deadline, with a job still active
        (so a device is pending) and enough active + succeeded jobs to reach the answers
        needed (so it is reachable), evaluate_round says RUNNING. Only a retry replaces a
        failed attempt, so active and succeeded jobs are each one device's latest attempt.
        Excused devices are not counted here: a round with any gets the full evaluation."""
        if now >= rnd.deadline or rnd.excused:
            return False
        active, succeeded = self._jobs.round_progress(rnd.round_id)
        return active > 0 and active + succeeded >= rnd.answers_needed

    def _evaluate(self, rnd: Round, now: float) -> RoundStatus:
        latest = self._jobs.latest_attempts(rnd.round_id)
        can_retry = {device: self._jobs.can_retry(job) for device, job in latest.items()}
        reasons = {}
        for device in rnd.device_ids:
            if device in latest:  # started: its job says how it went (no registry read)
                continue
            record = self._registry.get(device)
            if record is not None and record.last_skip_reason:
                reasons[device] = f"last skipped: {record.last_skip_reason}"
        return evaluate_round(rnd, latest, now, can_retry=can_retry, not_started_reasons=reasons)

    def _may_retry_in(self, round_id: str, device_id: str) -> bool:
        rnd = self._rounds.get(round_id)
        return (
            rnd is not None
            and self._rounds.outcome(round_id) is RoundOutcome.RUNNING
            and device_id not in rnd.excused
        )


def _below(value: float | None, limit: float | None) -> bool:
    """value < limit; a missing reading or a switched-off limit (None) never triggers."""
    return value is not None and limit is not None and value < limit


def _above(value: float | None, limit: float | None) -> bool:
    return value is not None and limit is not None and value > limit


def _drifted(record: DeviceRecord, policy: SchedulerPolicy) -> bool:
    """Over the absolute floor (drift_threshold) and over the device's own reference + margin.
    Drift triggers are off when the threshold is off."""
    if policy.drift_threshold is None or record.drift_score is None:
        return False
    if record.drift_score <= policy.drift_threshold:
        return False
    return record.drift_reference is None or record.drift_score > (
        record.drift_reference + policy.drift_margin
    )


def label_free_score(record: DeviceRecord, signal: LabelFreeSignal) -> float | None:
    """The record's calibrated label-free score on the chosen signal (None: not reported)."""
    scores = {
        LabelFreeSignal.CONFIDENCE: [record.confidence_score],
        LabelFreeSignal.FEATURE: [record.feature_score],
        LabelFreeSignal.EITHER: [record.confidence_score, record.feature_score],
    }[signal]
    present = [score for score in scores if score is not None]
    return max(present) if present else None


def _label_free_drifted(record: DeviceRecord, policy: SchedulerPolicy, now: float) -> bool:
    """Over the calibrated threshold for label_free_persistence_s, and over the device's score
    at the last run plus a margin (an adapter does not move the inputs back: a drift that stays
    must not start a run after every run)."""
    score = label_free_score(record, policy.label_free_signal)
    if score is None or not _above(score, policy.label_free_threshold):
        return False
    since = record.label_free_since
    if since is None or now - since < policy.label_free_persistence_s:
        return False
    reference = record.label_free_reference
    return reference is None or score > reference + policy.label_free_margin


def _drop_since_last_finetune(record: DeviceRecord) -> float | None:
    if record.accuracy is None or record.accuracy_at_last_finetune is None:
        return None
    return record.accuracy_at_last_finetune - record.accuracy
