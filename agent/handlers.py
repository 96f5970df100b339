"""What each job kind does. Runs on the job runner's worker thread, one job at a time.

A handler raises JobRejected when the job cannot be run as asked (nothing changed on the device)
and JobFailed when it ran and did not succeed; what it returns goes into the SUCCEEDED status
(a fine-tune's Report is its SUCCEEDED: the report goes out last, and no status follows).
Each takes the device's current data phase once, at its start (see agent.local_data). A device
without labels rejects what needs them (fine-tune, evaluate, apply only_if_better) with
INSUFFICIENT_DATA.

What the device runs changes only for the better: a fine-tune is installed (as the device's
personal adapter) only if it measures better on the hold-out than what runs now (higher
accuracy, or as accurate with a lower cross-entropy: agent/trainer/evaluation.py); an apply with
only_if_better likewise (agent/choice.py). Plain apply and rollback obey as asked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from agent.adapter_inbox import AdapterInbox
from agent.adapter_store import AdapterSource, AdapterStore, NothingToRollBack, StoredAdapter
from agent.choice import OwnChoice
from agent.jobs import Handler, JobContext, JobFailed, JobOutcome, JobRejected
from agent.learner import InvalidMethod, Learner
from agent.local_data import LocalData
from agent.meters import EnergyMeter, EnergyWindow, source_label
from agent.spool import SpoolFull
from agent.trainer.adapter import Adapter
from agent.trainer.errors import AdapterError
from agent.uplink import Uplink
from shared.protocol.enums import JobKind, JobReason
from shared.protocol.messages import (
    BASE_MODEL_VERSION,
    AdapterPublication,
    FetchRequest,
    Job,
    Report,
    ReportMetrics,
)

log = logging.getLogger(__name__)

NO_LABELS = (
    "the device has no labels (its data has no y): it can neither train nor measure accuracy"
)


@dataclass(frozen=True)
class Versioned:
    """Adapter arrays with the coordinator version they carry (None: a local fine-tune)."""

    version: int | None
    arrays: Mapping[str, np.ndarray] | None


class JobHandlers:
    def __init__(
        self,
        data: LocalData,
        store: AdapterStore,
        inbox: AdapterInbox,
        uplink: Uplink,
        meter: EnergyMeter,
        *,
        choice: OwnChoice,
        fetch_timeout_seconds: float = 60.0,
    ):
        self._data = data
        self._store = store
        self._inbox = inbox
        self._uplink = uplink
        self._meter = meter
        self._choice = choice
        self._fetch_timeout = fetch_timeout_seconds
        self.last_cache_bytes = 0  # Skip-Cache size of the last fine-tune, for telemetry

    def table(self) -> dict[JobKind, Handler]:
        return {
            JobKind.FINETUNE: self.finetune,
            JobKind.EVALUATE: self.evaluate,
            JobKind.APPLY_ADAPTER: self.apply_adapter,
            JobKind.ROLLBACK_ADAPTER: self.rollback_adapter,
        }

    @property
    def base_model_hash(self) -> str:
        return self._data.model.weights_hash

    def _learner(self) -> Learner:
        return self._data.current().learner

    # -- fine-tune ------------------------------------------------------------------------
    def finetune(self, job: Job, ctx: JobContext) -> JobOutcome:
        params = job.params
        learner = self._labelled_learner()  # a drift switch from now on applies to the next job
        current = self._store.current
        running = self._checked(learner, current.arrays if current else None)
        parent, start = self._start_of(params.start_version, current, running, learner, ctx)
        before = learner.holdout_measure(start)
        was_running = before if start is running else learner.holdout_measure(running)
        with EnergyWindow(self._meter) as energy:
            try:
                result = learner.finetune(
                    params, start=start, cancel=ctx.cancel, progress=ctx.progress
                )
            except InvalidMethod as err:
                raise JobRejected(JobReason.INVALID_PARAMS, str(err)) from None
        self.last_cache_bytes = result.cache_bytes
        after = learner.holdout_measure(result.adapter)
        installed = after.better_than(was_running)  # the device's own choice: better only
        metrics = ReportMetrics(
            accuracy_before=before.accuracy,
            accuracy_after=after.accuracy,
            samples=result.samples,
            epochs=result.epochs_run,
            finetune_seconds=result.seconds,
            joules=energy.result.joules,
            power_source=source_label(self._meter),
            cache_hit_rate=result.cache_hit_rate,
            base_model_hash=self.base_model_hash,
            method=params.method,
            rank=params.rank,
            accuracy_running=was_running.accuracy,
            installed=installed,
            holdout_samples=len(learner.holdout),
            steps=result.steps,
            loss_before=before.loss,
            loss_after=after.loss,
        )
        arrays = result.adapter.to_arrays()
        if installed:
            self._store.install(
                arrays,
                version=None,
                base_model_hash=self.base_model_hash,
                source=AdapterSource.FINETUNE,
                details={
                    "job_id": job.job_id,
                    "accuracy": after.accuracy,
                    "parent_version": parent,
                },
            )
        # Last, once nothing can fail any more: the report is the job's SUCCEEDED.
        ctx.ending()
        self._send_record(Report(job.job_id, arrays, metrics, parent_adapter_version=parent))
        return JobOutcome(
            {
                "accuracy_before": before.accuracy,
                "accuracy_after": after.accuracy,
                "accuracy_running": was_running.accuracy,
                "loss_after": after.loss,
                "loss_running": was_running.loss,
                "installed": installed,
                "start_version": params.start_version,
                "parent_adapter_version": parent,
                **self._running_now(),
                "steps": result.steps,
                "holdout_samples": len(learner.holdout),
                "joules": energy.result.joules,
                "power_source": source_label(self._meter),
                "energy_scope": energy.result.scope.value,
                "seconds": result.seconds,
                "samples": result.samples,
            },
            reported=True,
        )

    def _start_of(
        self,
        start_version: int | None,
        current: StoredAdapter | None,
        running: Adapter | None,
        learner: Learner,
        ctx: JobContext,
    ) -> tuple[int | None, Adapter | None]:
        """(parent version, start adapter) for FinetuneParams.start_version."""
        if start_version is None:  # what the device runs (as before start_version existed)
            return (current.meta.version if current else None), running
        if start_version == BASE_MODEL_VERSION:
            return None, None
        fleet = self._obtain(start_version, ctx)
        return start_version, self._checked(learner, fleet.arrays)

    # -- evaluate, apply, roll back --------------------------------------------------------------
    def evaluate(self, job: Job, ctx: JobContext) -> JobOutcome:
        learner = self._labelled_learner()
        wanted = job.params.adapter_version
        if wanted is None:
            current = self._store.current
            chosen = Versioned(
                current.meta.version if current else None, current.arrays if current else None
            )
        elif wanted == BASE_MODEL_VERSION:  # the reference a first fleet adapter must beat
            chosen = Versioned(BASE_MODEL_VERSION, None)
        else:
            chosen = self._obtain(wanted, ctx)
        accuracy = learner.holdout_accuracy(self._checked(learner, chosen.arrays))
        return JobOutcome(
            {
                "accuracy": accuracy,
                "adapter_version": chosen.version,
                "holdout_samples": len(learner.holdout),
            }
        )

    def apply_adapter(self, job: Job, ctx: JobContext) -> JobOutcome:
        learner = self._learner()
        wanted, only_if_better = job.params.adapter_version, job.params.only_if_better
        current = self._store.current
        if current is not None and current.meta.version == wanted:
            return JobOutcome({**self._running_now(), "already_running": True, "installed": False})
        if only_if_better and not learner.labelled:
            raise JobRejected(JobReason.INSUFFICIENT_DATA, f"only_if_better: {NO_LABELS}")
        chosen = self._obtain(wanted, ctx)
        adapter = self._checked(learner, chosen.arrays)
        detail = {}
        if only_if_better:
            verdict = self._choice.judge(learner, wanted, adapter)
            detail = verdict.detail()
            if not verdict.better:
                return JobOutcome({**detail, "installed": False, **self._running_now()})
        self._store.install(
            chosen.arrays,
            version=wanted,
            base_model_hash=self.base_model_hash,
            source=AdapterSource.COORDINATOR,
            details={"job_id": job.job_id},
        )
        accuracy = learner.holdout_accuracy(adapter) if learner.labelled else None
        return JobOutcome({**detail, "installed": True, **self._running_now(),
                           "accuracy": accuracy})  # fmt: skip

    def rollback_adapter(self, job: Job, ctx: JobContext) -> JobOutcome:
        learner = self._learner()
        try:
            restored = self._store.rollback()
        except NothingToRollBack as err:
            raise JobRejected(JobReason.ADAPTER_UNAVAILABLE, str(err)) from None
        adapter = self._checked(learner, restored.arrays)
        return JobOutcome(
            {
                "adapter_version": restored.meta.version,
                "accuracy": learner.holdout_accuracy(adapter) if learner.labelled else None,
                "source": restored.meta.source.value,
                "origin": self._store.origin.value,
            }
        )

    # -- helpers --------------------------------------------------------------------------------
    def _labelled_learner(self) -> Learner:
        learner = self._learner()
        if not learner.labelled:
            raise JobRejected(JobReason.INSUFFICIENT_DATA, NO_LABELS)
        return learner

    def _running_now(self) -> dict:
        """What the device runs: its fleet version (None: personal or none) and origin."""
        current = self._store.current
        return {
            "adapter_version": current.meta.version if current else None,
            "origin": self._store.origin.value,
        }

    def _obtain(self, version: int, ctx: JobContext) -> Versioned:
        """A coordinator version from the store, the inbox, or fetched and waited for."""
        stored = self._store.find(version)
        if stored is not None:
            return Versioned(version, stored.arrays)
        publication = self._inbox.get(version)
        if publication is None:
            self._send_record(FetchRequest(version))
            publication = self._inbox.wait_for(version, self._fetch_timeout, ctx.cancel)
        if publication is None:
            if ctx.cancel.is_set():
                raise JobFailed(JobReason.CANCELED, "cancelled while waiting for the adapter")
            raise JobFailed(
                JobReason.ADAPTER_UNAVAILABLE,
                f"adapter version {version} did not arrive in {self._fetch_timeout:.0f} s",
            )
        self._check_publication(publication)
        return Versioned(version, publication.arrays)

    def _check_publication(self, publication: AdapterPublication) -> None:
        if publication.base_model_hash != self.base_model_hash:
            raise JobRejected(
                JobReason.BASE_MODEL_MISMATCH,
                f"adapter {publication.version} is for base model {publication.base_model_hash}",
            )

    @staticmethod
    def _checked(learner: Learner, arrays: Mapping[str, np.ndarray] | None) -> Adapter | None:
        try:
            return learner.adapter(arrays)
        except AdapterError as err:
            raise JobRejected(
                JobReason.MALFORMED, f"adapter does not fit the model: {err}"
            ) from None

    def _send_record(self, message: Report | FetchRequest) -> None:
        try:
            self._uplink.send(message)
        except SpoolFull as err:
            # Never drop a report silently: the job fails and its status says why.
            raise JobFailed(
                JobReason.INTERNAL_ERROR, f"could not spool {type(message).__name__}: {err}"
            ) from None
