"""Builders for the coordinator's service, bridge and API tests: a config over a tmp state dir,
and simulated devices that produce the decoded messages a real agent's would (no Ray, no MQTT)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from coordinator.clock import ManualClock
from coordinator.config import CoordinatorConfig
from coordinator.federation import FederationPolicy
from coordinator.ingest import Received
from coordinator.outbound import Outbound
from coordinator.rollout import RolloutPolicy
from coordinator.scheduler import SchedulerPolicy
from coordinator.service import FleetService
from shared.mqtt import MqttSettings
from shared.protocol import (
    AdapterOrigin,
    DesiredState,
    Envelope,
    FetchRequest,
    Heartbeat,
    Job,
    JobKind,
    JobReason,
    JobState,
    JobStatus,
    Presence,
    PresenceState,
    Report,
    ReportMetrics,
)
from tests.coord_helpers import SHAPE, random_factors

BASE_HASH = "b" * 64


def make_config(
    state_dir: Path,
    *,
    federation: FederationPolicy | None = None,
    rollout: RolloutPolicy | None = None,
    **policy: object,
) -> CoordinatorConfig:
    """One round per run unless `federation` says otherwise: most tests are about a round."""
    settings = {
        "max_concurrent_jobs": 4,
        "accuracy_threshold": None,
        "accuracy_drop_margin": None,
        "drift_threshold": None,
        "job_timeout_s": 60.0,
        "round_deadline_s": 120.0,
        "min_completion_ratio": 0.6,
        **policy,
    }
    return CoordinatorConfig(
        mqtt=MqttSettings("localhost"),
        state_dir=state_dir,
        metrics_port=0,
        api_port=0,
        policy=SchedulerPolicy(**settings),
        rollout=rollout or RolloutPolicy(canary_fraction=1.0, max_accuracy_regression=0.02),
        federation=federation or FederationPolicy(max_rounds=1),
    )


class SimDevice:
    """One device's side of the protocol, as decoded messages stamped like an agent's."""

    def __init__(
        self,
        device_id: str,
        clock: ManualClock,
        *,
        base_hash: str = BASE_HASH,
        cohort="fan",
        labelled: bool = True,
        signature: np.ndarray | None = None,
    ) -> None:
        self.device_id = device_id
        self.clock = clock
        self.base_hash = base_hash
        self.cohort = cohort
        self.labelled = labelled
        self.signature = signature
        self.boot_id = uuid.uuid4().hex[:16]
        self.seq = 0
        self.rng = np.random.default_rng(abs(hash(device_id)) % 2**32)

    def received(self, message) -> Received:
        self.seq += 1
        envelope = Envelope(message, sender=self.device_id, boot_id=self.boot_id, seq=self.seq)
        return Received(envelope, self.clock())

    def presence(self, online: bool = True) -> Received:
        state = PresenceState.ONLINE if online else PresenceState.OFFLINE
        samples = 100 if self.labelled else 0
        return self.received(
            Presence(state, self.boot_id, "test", self.base_hash, self.cohort,
                     train_samples=samples, holdout_samples=samples // 4)
        )  # fmt: skip

    def heartbeat(
        self,
        *,
        adapter_version: int | None = None,
        drift: float = 1.0,
        confidence: float | None = None,
        feature: float | None = None,
        origin: AdapterOrigin | None = None,
    ) -> Received:
        signature = None if self.signature is None else self.signature.astype(np.float32)
        return self.received(
            Heartbeat(
                power_w=1.5,
                power_source="model:test",
                energy_j_total=10.0 * self.seq,
                cache_bytes=0,
                spool_depth=0,
                spool_dropped=0,
                uptime_s=5.0,
                temperature_c=45.0,
                drift_score=drift,
                adapter_version=adapter_version,
                confidence_score=confidence,
                feature_score=feature,
                signature=signature,
                signature_rows=None if signature is None else 64,
                adapter_origin=origin,
            )
        )

    def status(
        self,
        job_id: str,
        state: JobState,
        detail: Mapping | None = None,
        reason_code: JobReason | None = None,
    ) -> Received:
        return self.received(
            JobStatus(job_id, state, detail=dict(detail or {}), reason_code=reason_code)
        )

    def report(
        self,
        job_id: str,
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
        samples: int = 100,
        before: float = 0.6,
        after: float = 0.9,
        base_hash: str | None = None,
        loss_before: float | None = None,
        installed: bool | None = None,
        running: float | None = None,
    ) -> Received:
        metrics = ReportMetrics(
            accuracy_before=before,
            accuracy_after=after,
            samples=samples,
            epochs=5,
            finetune_seconds=2.0,
            joules=3.0,
            power_source="model:test",
            cache_hit_rate=0.5,
            base_model_hash=base_hash or self.base_hash,
            method="skip2-lora",
            rank=4,
            loss_before=loss_before,
            installed=installed,
            accuracy_running=running,
        )
        adapter = dict(arrays) if arrays is not None else random_factors(self.rng, shape=SHAPE)
        return self.received(Report(job_id, adapter, metrics))

    def fetch(self, version: int) -> Received:
        return self.received(FetchRequest(version))

    def finetune(self, job_id: str, **report: object) -> list[Received]:
        """What an agent sends for a fine-tune job that succeeds soon: its report, which is its
        SUCCEEDED (an IN_PROGRESS comes only from a job that runs or waits long)."""
        return [self.report(job_id, **report)]


def finetune_jobs(service: FleetService) -> dict[str, Job]:
    """Asks every device to fine-tune; the fine-tune job the next tick sends each, by device."""
    service.request_finetune(all_=True)
    return dict(jobs_in(service.tick(), JobKind.FINETUNE))


def jobs_in(
    outbound: Iterable[Outbound], kind: JobKind | None = None, device: str | None = None
) -> list[tuple[str, Job]]:
    """(device, job) for the job commands among outbound messages, the APPLY_ADAPTER jobs that
    desired pointers offer included."""
    found = []
    for o in outbound:
        job = o.message.apply_job() if isinstance(o.message, DesiredState) else o.message
        if not isinstance(job, Job):
            continue
        if (kind is None or job.kind is kind) and (device is None or o.device_id == device):
            found.append((o.device_id, job))
    return found


def fail_handling_for(monkeypatch, service, device_id: str) -> None:
    """The service's message handler raises (as a bug would) for every message of `device_id`."""
    handle = service._handler.handle

    def failing(received: Received) -> None:
        if received.device_id == device_id:
            raise RuntimeError("a bug in a handler")
        handle(received)

    monkeypatch.setattr(service._handler, "handle", failing)


class LostAggregations:
    """An aggregator whose tasks never come back (its process died: submitted, never
    collected)."""

    def submit(self, request, algorithms) -> None:
        pass

    def collect(self) -> list:
        return []

    def pending(self) -> set:
        return set()
