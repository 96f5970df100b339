"""Devices of the in-process fault scenarios: they answer the coordinator's fleet state
(coordinator.service.FleetService) with the decoded messages an agent sends.

An honest device does the agent's work for real: it fine-tunes with agent.trainer from the
version the job names, measures on its own hold-out, installs a version only when told to
(and, with only_if_better, only when it measures better), and refuses adapters the agent's
checks refuse. A liar sends what the issue's attacker sent; a mute device heartbeats but never
answers a job. Only the transport is short-cut: a publication any device received is at hand
for every device (an agent would fetch it).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import numpy as np

from agent.trainer.adapter import Adapter
from agent.trainer.errors import AdapterError
from agent.trainer.evaluation import measure
from agent.trainer.finetune import finetune
from coordinator.clock import ManualClock
from coordinator.ingest import Received
from shared.protocol import (
    BASE_MODEL_VERSION,
    AdapterPublication,
    DesiredState,
    Envelope,
    Heartbeat,
    Job,
    JobKind,
    JobState,
    JobStatus,
    Presence,
    PresenceState,
    Report,
    ReportMetrics,
)
from skipfleet.faults_world import FanWorld, Share

Versions = dict[int, Adapter]  # every version published so far, as the agents would decode it


class Device:
    """An honest device (subclasses lie or stay silent)."""

    def __init__(
        self,
        device_id: str,
        world: FanWorld,
        share: Share,
        clock: ManualClock,
        versions: Versions,
        cohort: str = "fan",
    ) -> None:
        self.device_id, self.world, self.share = device_id, world, share
        self.clock, self.versions, self.cohort = clock, versions, cohort
        self.boot_id = uuid.uuid4().hex[:16]
        self.seq = 0
        self.running: int | None = None  # the fleet version it runs (None: the base model)

    # -- what it sends
    def _received(self, message) -> Received:
        self.seq += 1
        envelope = Envelope(message, sender=self.device_id, boot_id=self.boot_id, seq=self.seq)
        return Received(envelope, self.clock())

    def presence(self) -> Received:
        samples = len(self.share.train)
        return self._received(
            Presence(
                PresenceState.ONLINE,
                self.boot_id,
                "bench-faults",
                self.world.model.weights_hash,
                self.cohort,
                train_samples=samples,
                holdout_samples=len(self.share.holdout),
            )
        )

    def heartbeat(self) -> Received:
        return self._received(
            Heartbeat(
                power_w=1.5,
                power_source="model:bench",
                energy_j_total=float(self.seq),
                cache_bytes=0,
                spool_depth=0,
                spool_dropped=0,
                uptime_s=1.0,
                temperature_c=45.0,
                drift_score=1.0,
                adapter_version=self.running,
            )
        )

    def _status(self, job: Job, detail: dict | None = None) -> Received:
        return self._received(JobStatus(job.job_id, JobState.SUCCEEDED, detail=detail or {}))

    # -- what it does with what arrives
    def deliver(self, message) -> list[Received]:
        if isinstance(message, AdapterPublication):
            self._decode(message)
            return []
        if isinstance(message, DesiredState):  # the adapter inline, and the offer it makes
            if message.adapter is not None:
                self._decode(message.adapter)
            message = message.apply_job()  # a plain pointer: the offers carry the same
        if not isinstance(message, Job):
            return []
        handlers: dict[JobKind, Callable[[Job], list[Received]]] = {
            JobKind.FINETUNE: self.finetune,
            JobKind.EVALUATE: self.evaluate,
            JobKind.APPLY_ADAPTER: self.apply,
        }
        handler = handlers.get(message.kind)
        return [] if handler is None else self._answer(message, handler)

    def _answer(self, job: Job, handler) -> list[Received]:
        """Its end alone: a job that ends at once sends no IN_PROGRESS (agent/job_progress.py)."""
        try:
            return handler(job)
        except KeyError as missing:  # a version it never received (or refused): the job fails
            failed = JobStatus(job.job_id, JobState.FAILED, reason=f"no version {missing}")
            return [self._received(failed)]

    def _decode(self, publication: AdapterPublication) -> None:
        model = self.world.model
        try:  # the agent's own check: shape, finite, within ADAPTER_VALUE_BOUND
            adapter = Adapter.from_arrays(
                dict(publication.arrays), model.layer_input_dims, model.n_classes
            )
        except AdapterError:
            return
        self.versions.setdefault(publication.version, adapter)

    def adapter(self, version: int | None) -> Adapter | None:
        if version is None:
            version = self.running
        if version in (None, BASE_MODEL_VERSION):
            return None
        return self.versions[version]

    def holdout_accuracy(self, version: int | None) -> float:
        holdout = self.share.holdout
        return measure(self.world.model, holdout.X, holdout.y, self.adapter(version)).accuracy

    def test_accuracy(self) -> float:
        test = self.world.test
        return self.world.model.accuracy(test.X, test.y, self.adapter(self.running))

    def finetune(self, job: Job) -> list[Received]:
        p = job.params
        start = self.adapter(p.start_version)
        result = finetune(
            self.world.model,
            self.share.train.X,
            self.share.train.y,
            method=p.method,
            epochs=p.epochs,
            lr=p.lr,
            batch_size=p.batch_size,
            rank=p.rank,
            seed=p.seed,
            start=start,
            steps=p.steps,
        ).adapter
        before = self.holdout_accuracy(p.start_version)
        after = measure(self.world.model, self.share.holdout.X, self.share.holdout.y, result)
        # the report is the job's SUCCEEDED: the agent sends no status after it
        return [
            self._report(job, result.to_arrays(), len(self.share.train), before, after.accuracy)
        ]

    def _report(self, job, arrays, samples, before, after) -> Received:
        metrics = ReportMetrics(
            accuracy_before=before,
            accuracy_after=after,
            samples=samples,
            epochs=1,
            finetune_seconds=1.0,
            joules=1.0,
            power_source="model:bench",
            cache_hit_rate=0.0,
            base_model_hash=self.world.model.weights_hash,
            method=job.params.method,
            rank=job.params.rank,
            installed=False,
            holdout_samples=len(self.share.holdout),
        )
        return self._received(Report(job.job_id, arrays, metrics))

    def evaluate(self, job: Job) -> list[Received]:
        version = job.params.adapter_version
        return [self._status(job, {"accuracy": self.holdout_accuracy(version)})]

    def apply(self, job: Job) -> list[Received]:
        wanted = job.params.adapter_version
        installed = wanted in self.versions and (
            not job.params.only_if_better
            or self.holdout_accuracy(wanted) > self.holdout_accuracy(self.running)
        )
        if installed:
            self.running = wanted
        return [self._status(job, {"installed": installed, "adapter_version": self.running})]


class Liar(Device):
    """The issue's attacker on a valid account: an update scaled to just under the value bound
    and against what it learned, a sample count of 2**62, and canary answers that praise the
    candidate (1.0) and damn the current version (0.0)."""

    SAMPLES = 2**62
    PEAK = 999.0  # shared.protocol.checks.ADAPTER_VALUE_BOUND is 1e3: the largest it may send

    def finetune(self, job: Job) -> list[Received]:
        honest = super().finetune(job)[0].envelope.message.adapter
        arrays = {
            name: -a * (self.PEAK / max(float(np.abs(a).max()), 1e-12))
            for name, a in honest.items()
        }
        return [self._report(job, arrays, self.SAMPLES, 0.0, 1.0)]

    def evaluate(self, job: Job) -> list[Received]:
        candidate = job.params.adapter_version not in (None, BASE_MODEL_VERSION, self.running)
        return [self._status(job, {"accuracy": 1.0 if candidate else 0.0})]


class Overflow(Device):
    """Reports a finite 1e30 everywhere (it overflowed float32 and wedged the round before)."""

    def finetune(self, job: Job) -> list[Received]:
        honest = super().finetune(job)[0].envelope.message.adapter
        arrays = {name: np.full_like(a, 1e30) for name, a in honest.items()}
        return [self._report(job, arrays, len(self.share.train), 0.5, 0.9), self._status(job)]


class Mute(Device):
    """Online (it heartbeats) but answers no job."""

    def deliver(self, message) -> list[Received]:
        return []
