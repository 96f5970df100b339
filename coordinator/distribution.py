"""Getting fleet adapters onto devices: canary evaluation, promotion, rollback, catching up.

A canary never switches adapter: it gets two EVALUATE jobs, one for the candidate version
(evaluated on its hold-out without installing it) and one for the cohort's current fleet version
(or the base model alone before the first), and the RolloutManager compares the two means.
On promotion every cohort member gets the retained desired pointer, the adapter and an
APPLY_ADAPTER job (the agent moves only on that job; the pointer is what a device that comes
back finds). A rollback therefore leaves devices untouched.
Devices that were offline, or failed to apply, are caught up by reconcile(), with a back-off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from coordinator.adapter_store import AdapterStoreError, StoredAdapter
from coordinator.commands import CanaryRole, CommandRecord
from coordinator.fleet import Conflict, Fleet, NotFound
from coordinator.jobs import Job, JobState
from coordinator.observations import RolloutDecided, RolloutResult
from coordinator.outbound import apply_job, desired, evaluate_job, publication
from coordinator.registry import DeviceRecord
from coordinator.rollout import Rollout, RolloutError, RolloutState
from shared.protocol import BASE_MODEL_VERSION, JobKind, JobStatus

log = logging.getLogger(__name__)


class AdapterDistributor:
    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    # ---- canary

    def start_canary(self, cohort: str, version: int) -> tuple[str | None, str]:
        """Starts the candidate's canary; returns (rollout id or None, what happened)."""
        f = self._fleet
        members = [r for r in f.registry.devices(cohort) if f.reachable(r)]
        try:
            rollout = f.rollouts.start(cohort, version, [r.device_id for r in members])
        except RolloutError as err:
            log.warning("cohort %s v%d not rolled out: %s", cohort, version, err)
            return None, f"not rolled out: {err}"
        stored = f.store.get(cohort, version)
        # The candidate must not be worse than what the cohort runs as a fleet: its current
        # version, or the bare base model before the first one. Not a device's own fine-tuned
        # adapter: that one was trained on the very data it is measured on, and always wins.
        reference = f.store.current_version(cohort) or BASE_MODEL_VERSION
        for device in rollout.canary_devices:
            record = f.registry.require(device)
            f.send(device, publication(stored, f.config.encoding))
            for role, evaluated in (
                (CanaryRole.CANDIDATE, version),
                (CanaryRole.CURRENT, reference),
            ):
                job = f.create_job(device, JobKind.EVALUATE.value, trigger="canary")
                f.commands.add(
                    CommandRecord(
                        job.job_id,
                        device,
                        JobKind.EVALUATE,
                        evaluated,
                        job.created_at,
                        rollout_id=rollout.rollout_id,
                        role=role,
                    )
                )
                f.send(device, evaluate_job(job, evaluated, record.base_model_hash))
        log.info("cohort %s v%d: canary on %s", cohort, version, list(rollout.canary_devices))
        return rollout.rollout_id, f"canary on {', '.join(rollout.canary_devices)}"

    def on_job_finished(self, job: Job, status: JobStatus | None) -> None:
        """A command job reached a terminal state (from its device, or timed out here)."""
        command = self._fleet.commands.get(job.job_id)
        if command is None:
            return
        succeeded = job.state is JobState.SUCCEEDED
        if command.kind is JobKind.APPLY_ADAPTER:
            self._on_applied(command, succeeded, job)
        elif succeeded:
            self._on_evaluated(command, _accuracy(status))
        elif command.rollout_id is not None:
            reason = f"evaluation {job.state}" + (f": {job.detail}" if job.detail else "")
            self._decide(
                command.rollout_id,
                lambda r: self._fleet.rollouts.record_failure(r, command.device_id, reason),
            )

    def check_deadlines(self) -> None:
        for rollout in self._fleet.rollouts.check_deadlines():
            self._decided(rollout)

    # ---- operator decisions

    def evaluate(self, device_ids: Sequence[str], version: int | None = None) -> dict:
        """Each reachable device measures on its own hold-out the adapter it runs (recorded in
        the registry: `GET /devices`), or the cohort's `version` (0: the base model alone)."""
        f = self._fleet
        sent, skipped = [], {}
        for device in device_ids:
            record = f.registry.get(device)
            if record is None or not f.reachable(record):
                skipped[device] = "unknown device" if record is None else "not reachable"
                continue
            job = f.create_job(device, JobKind.EVALUATE.value, trigger="operator")
            f.commands.add(
                CommandRecord(job.job_id, device, JobKind.EVALUATE, version, job.created_at)
            )
            f.send(device, evaluate_job(job, version, record.base_model_hash))
            sent.append({"device": device, "job_id": job.job_id})
        return {"evaluating": sent, "skipped": skipped}

    def promote(self, cohort: str, version: int) -> dict:
        f = self._fleet
        running = f.rollouts.active(cohort)
        if running is not None:
            raise Conflict(f"cohort {cohort} has canary rollout {running.rollout_id} running")
        if f.store.meta(cohort, version) is None:
            raise NotFound(f"cohort {cohort} has no adapter version {version}")
        f.store.set_current(cohort, version)
        f.events.record(RolloutDecided(RolloutResult.PROMOTED))
        return {"cohort": cohort, "current_version": version, "devices": self.distribute(cohort)}

    def rollback(self, cohort: str) -> dict:
        f = self._fleet
        current = f.store.current_version(cohort)
        if current is None:
            raise Conflict(f"cohort {cohort} runs no fleet adapter: nothing to roll back")
        parent = f.store.meta(cohort, current).parent_version
        if parent is None:
            # The agent cannot be told to drop its adapter for the bare base model.
            raise Conflict(f"cohort {cohort} v{current} has no parent version to roll back to")
        f.store.set_current(cohort, parent)
        f.events.record(RolloutDecided(RolloutResult.ROLLED_BACK))
        log.info("cohort %s rolled back from v%d to v%d", cohort, current, parent)
        return {"cohort": cohort, "current_version": parent, "devices": self.distribute(cohort)}

    # ---- distribution

    def distribute(self, cohort: str) -> list[str]:
        """Points every member at the cohort's current version; applies it where reachable."""
        f = self._fleet
        version = f.store.current_version(cohort)
        stored = None if version is None else f.store.get(cohort, version)  # once, not per device
        sent = []
        for record in f.registry.devices(cohort):
            if stored is not None and f.reachable(record) and record.adapter_version != version:
                self._apply(record, stored)
                sent.append(record.device_id)
            # The pointer after the adapter: an agent given the pointer first has nothing to
            # install and sends a FetchRequest, on a promotion every reachable device at once.
            f.send(record.device_id, desired(version, record.base_model_hash, cohort))
        return sent

    def reconcile(self) -> None:
        """Applies the current version on reachable members that run another one: devices that
        were offline at promotion, joined later, or failed to apply (after a back-off)."""
        f = self._fleet
        now = f.clock()
        for cohort in f.store.cohorts():
            version = f.store.current_version(cohort)
            if version is None:
                continue
            stored = None
            for record in f.registry.devices(cohort):
                if record.adapter_version == version or not f.reachable(record):
                    continue
                if f.jobs.active(record.device_id) or self._recently_applied(record, version, now):
                    continue
                stored = stored or f.store.get(cohort, version)
                self._apply(record, stored)
                f.send(record.device_id, desired(version, record.base_model_hash, cohort))

    def on_registered(self, record: DeviceRecord) -> None:
        """A device joined (or changed) its cohort: tell it what it should run."""
        version = self._fleet.store.current_version(record.cohort)
        if version is not None:
            self._fleet.send(
                record.device_id, desired(version, record.base_model_hash, record.cohort)
            )

    def answer_fetch(self, device_id: str, version: int) -> None:
        f = self._fleet
        record = f.registry.get(device_id)
        if record is None or record.cohort is None:
            f.reject("unknown_device", f"fetch from {device_id}, who never sent its presence")
            return
        try:
            stored = f.store.get(record.cohort, version, base_model_hash=record.base_model_hash)
        except AdapterStoreError as err:
            f.reject("unknown_adapter", f"fetch from {device_id}: {err}")
            return
        f.send(device_id, publication(stored, f.config.encoding))

    # ---- internals

    def _apply(self, record: DeviceRecord, stored: StoredAdapter) -> None:
        f = self._fleet
        version = stored.meta.version
        job = f.create_job(record.device_id, JobKind.APPLY_ADAPTER.value, trigger="rollout")
        f.commands.add(
            CommandRecord(
                job.job_id, record.device_id, JobKind.APPLY_ADAPTER, version, job.created_at
            )
        )
        # The adapter first, so the apply job finds it in the agent's inbox and needs no fetch.
        f.send(record.device_id, publication(stored, f.config.encoding))
        f.send(record.device_id, apply_job(job, version, record.base_model_hash))

    def _recently_applied(self, record: DeviceRecord, version: int, now: float) -> bool:
        last = self._fleet.commands.last_apply(record.device_id, version)
        return last is not None and now - last.created_at < self._fleet.config.reapply_backoff_s

    def _on_applied(self, command: CommandRecord, succeeded: bool, job: Job) -> None:
        if succeeded:
            self._fleet.registry.set_adapter_version(command.device_id, command.adapter_version)
        else:
            log.warning(
                "%s did not apply v%s: %s %s",
                command.device_id,
                command.adapter_version,
                job.state,
                job.detail or "",
            )

    def _on_evaluated(self, command: CommandRecord, accuracy: float | None) -> None:
        f = self._fleet
        if accuracy is None:
            f.reject("invalid_status", f"evaluation {command.job_id} carries no accuracy")
            if command.rollout_id is not None:
                self._decide(
                    command.rollout_id,
                    lambda r: f.rollouts.record_failure(
                        r, command.device_id, "evaluation without an accuracy"
                    ),
                )
            return
        if command.role is None and command.adapter_version is None:  # what the device runs
            f.registry.record_accuracy(command.device_id, accuracy)
        if command.rollout_id is None:
            return
        f.commands.record_accuracy(command.job_id, accuracy)
        measured = f.commands.canary_accuracies(command.rollout_id, command.device_id)
        candidate, current = measured.get(CanaryRole.CANDIDATE), measured.get(CanaryRole.CURRENT)
        if candidate is not None and current is not None:
            self._decide(
                command.rollout_id,
                lambda r: f.rollouts.record_result(
                    r, command.device_id, accuracy_candidate=candidate, accuracy_current=current
                ),
            )

    def _decide(self, rollout_id: str, record) -> None:
        """Records a canary outcome; acts if that decided the rollout (and not before)."""
        before = self._fleet.rollouts.get(rollout_id)
        if before is None or before.is_decided:
            return
        after: Rollout = record(rollout_id)
        if after.is_decided:
            self._decided(after)

    def _decided(self, rollout: Rollout) -> None:
        promoted = rollout.state is RolloutState.PROMOTED
        result = RolloutResult.PROMOTED if promoted else RolloutResult.ROLLED_BACK
        self._fleet.events.record(RolloutDecided(result))
        log.info(
            "rollout %s of %s v%d: %s (%s)",
            rollout.rollout_id,
            rollout.cohort,
            rollout.candidate_version,
            rollout.state,
            rollout.reason,
        )
        if promoted:
            self.distribute(rollout.cohort)


def _accuracy(status: JobStatus | None) -> float | None:
    if status is None:
        return None
    value = status.detail.get("accuracy")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None
