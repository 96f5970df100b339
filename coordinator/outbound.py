"""What the fleet state asks the MQTT bridge to publish, as protocol messages.

The fleet state (in the Ray actor) decides; the bridge (in the driver, the only MQTT client)
encodes, chunks and publishes. Outbound values cross the Ray boundary, so they are plain data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from coordinator.adapter_store import StoredAdapter
from coordinator.config import FinetuneSettings
from coordinator.jobs import Job as JobRecord
from shared.protocol import (
    AdapterPublication,
    ArrayEncoding,
    CancelParams,
    DesiredState,
    EvaluateParams,
    FinetuneParams,
    Job,
    JobKind,
    Lineage,
    kind_of,
    topic_kind_for,
)
from shared.protocol.messages import JobParams
from shared.topics import TopicKind

DownlinkMessage = Job | AdapterPublication | DesiredState


@dataclass(frozen=True)
class Outbound:
    device_id: str
    message: DownlinkMessage
    seq: int | None = None  # its durable outbox row (the bridge acknowledges it by this)
    message_id: str | None = None  # the envelope's id, the same on every re-send

    @property
    def topic_kind(self) -> TopicKind:
        return topic_kind_for(kind_of(self.message))


def job_seed(job_id: str) -> int:
    """A per-job training seed, reproducible from the job id."""
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:4], "big") >> 1


def finetune_job(
    record: JobRecord,
    settings: FinetuneSettings,
    base_model_hash: str | None,
    *,
    start_version: int | None = None,
    steps: int | None = None,
) -> Job:
    """A fine-tune; in a federated run it starts from `start_version` (0: the base model) and
    runs a budget of `steps` SGD steps."""
    params = FinetuneParams(
        epochs=settings.epochs,
        lr=settings.lr,
        seed=job_seed(record.job_id),
        method=settings.method,
        batch_size=settings.batch_size,
        rank=settings.rank,
        max_samples=settings.max_samples,
        steps=steps,
        start_version=start_version,
    )
    return _job(record, JobKind.FINETUNE, params, base_model_hash)


def evaluate_job(record: JobRecord, version: int | None, base_model_hash: str | None) -> Job:
    return _job(record, JobKind.EVALUATE, EvaluateParams(version), base_model_hash)


def cancel_job(record: JobRecord, target_job_id: str, base_model_hash: str | None) -> Job:
    return _job(record, JobKind.CANCEL, CancelParams(target_job_id), base_model_hash)


def _job(record: JobRecord, kind: JobKind, params: JobParams, base_model_hash: str | None) -> Job:
    # The job expires on the device when the coordinator would time it out anyway.
    return Job(record.job_id, kind, params, record.deadline, base_model_hash)


def publication(stored: StoredAdapter, encoding: ArrayEncoding | str) -> AdapterPublication:
    """A stored version as it goes to devices. Its lineage names the round, the algorithm and
    the parent version, not the devices that took part: those stay with the coordinator (GET
    /adapters/{cohort}/{version}). Every contributor's id made the adapter grow with the fleet
    (10,000 devices: ~100 KB more per device), so past ~2,000 devices no adapter fitted inside
    its pointer and every device fetched one, chunked; it also told each device which others
    trained."""
    meta = stored.meta
    return AdapterPublication(
        version=meta.version,
        base_model_hash=meta.base_model_hash,
        cohort=meta.cohort,
        arrays=stored.arrays,
        lineage=Lineage(
            round_id=meta.round_id or "none",
            device_ids=(),
            algorithm=meta.algorithm,
            parent_version=meta.parent_version,
        ),
        created_at=meta.created_at,
        encoding=ArrayEncoding(encoding),
    )


def desired(
    version: int | None,
    base_model_hash: str,
    cohort: str,
    *,
    only_if_better: bool = False,
    offer: JobRecord | None = None,
) -> DesiredState:
    """The retained pointer; with `offer`, also that APPLY_ADAPTER job (its id and deadline),
    which the device answers with one terminal status."""
    return DesiredState(
        adapter_version=version,
        base_model_hash=base_model_hash,
        cohort=cohort,
        only_if_better=only_if_better,
        job_id=None if offer is None else offer.job_id,
        expires_at=None if offer is None else offer.deadline,
    )
