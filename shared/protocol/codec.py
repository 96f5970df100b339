"""Encode and decode every message kind: one to/from pair per kind, and the envelope around them.

Wire form of an envelope (a msgpack map; optional fields are left out when unset):
    {"schema": 1, "kind": "report", "id": <uuid4 hex>, "sender": "pi-07", "sent_at": <unix s>,
     "expires_at": ..., "reply_to": ..., "correlation_id": ..., "boot_id": ..., "seq": ...,
     "body": {<the message's fields>}}
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.protocol import checks
from shared.protocol.arrays import (
    array_from_wire,
    array_to_wire,
    compress_arrays,
    decompress_arrays,
)
from shared.protocol.enums import (
    AdapterOrigin,
    JobKind,
    JobReason,
    JobState,
    MessageKind,
    PresenceState,
)
from shared.protocol.envelope import SCHEMA_VERSION, Envelope
from shared.protocol.errors import DecodeError
from shared.protocol.messages import (
    AdapterPublication,
    ApplyAdapterParams,
    CancelParams,
    Chunk,
    DesiredState,
    EvaluateParams,
    FetchRequest,
    FinetuneParams,
    Heartbeat,
    Job,
    JobParams,
    JobStatus,
    Lineage,
    Message,
    Presence,
    Report,
    ReportMetrics,
    RollbackAdapterParams,
)
from shared.protocol.wire import Fields, WireMap, pack, unpack

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a whole (reassembled) envelope; one publish is smaller
_OPTIONAL_HEADERS = ("expires_at", "reply_to", "correlation_id", "boot_id", "seq")


# --- Presence -----------------------------------------------------------------------------
def presence_to_wire(m: Presence) -> WireMap:
    return {
        "state": m.state.value,
        "boot_id": m.boot_id,
        "agent_version": m.agent_version,
        "base_model_hash": m.base_model_hash,
        "cohort": m.cohort,
        "device": dict(m.device),
        "train_samples": m.train_samples,
        "holdout_samples": m.holdout_samples,
    }


def presence_from_wire(f: Fields) -> Presence:
    return Presence(
        state=f.choice("state", PresenceState),
        boot_id=f.text("boot_id"),
        agent_version=f.text("agent_version"),
        base_model_hash=f.text("base_model_hash"),
        cohort=f.text("cohort"),
        device=f.mapping("device"),
        train_samples=f.integer("train_samples", optional=True),
        holdout_samples=f.integer("holdout_samples", optional=True),
    )


# --- Heartbeat ----------------------------------------------------------------------------
def heartbeat_to_wire(m: Heartbeat) -> WireMap:
    return {
        "power_w": float(m.power_w),
        "power_source": m.power_source,
        "energy_j_total": float(m.energy_j_total),
        "cache_bytes": m.cache_bytes,
        "spool_depth": m.spool_depth,
        "spool_dropped": m.spool_dropped,
        "uptime_s": float(m.uptime_s),
        "temperature_c": m.temperature_c,
        "drift_score": m.drift_score,
        "adapter_version": m.adapter_version,
        "busy_job_id": m.busy_job_id,
        "drifted": m.drifted,
        "confidence_score": m.confidence_score,
        "feature_score": m.feature_score,
        "signature": None if m.signature is None else array_to_wire(m.signature),
        "signature_rows": m.signature_rows,
        "adapter_origin": None if m.adapter_origin is None else m.adapter_origin.value,
        "clock_offset_s": m.clock_offset_s,
    }


def heartbeat_from_wire(f: Fields) -> Heartbeat:
    return Heartbeat(
        power_w=f.number("power_w"),
        power_source=f.text("power_source"),
        energy_j_total=f.number("energy_j_total"),
        cache_bytes=f.integer("cache_bytes"),
        spool_depth=f.integer("spool_depth"),
        spool_dropped=f.integer("spool_dropped"),
        uptime_s=f.number("uptime_s"),
        temperature_c=f.number("temperature_c", optional=True),
        drift_score=f.number("drift_score", optional=True),
        adapter_version=f.integer("adapter_version", optional=True),
        busy_job_id=f.text("busy_job_id", optional=True),
        drifted=f.boolean("drifted", optional=True),
        confidence_score=f.number("confidence_score", optional=True),
        feature_score=f.number("feature_score", optional=True),
        signature=_optional_vector(f, "signature"),
        signature_rows=f.integer("signature_rows", optional=True),
        adapter_origin=f.choice("adapter_origin", AdapterOrigin, optional=True),
        clock_offset_s=f.number("clock_offset_s", optional=True),
    )


def _optional_vector(f: Fields, key: str) -> np.ndarray | None:
    """A float vector (float16 or float32 on the wire) as float32, or None."""
    wire = f.mapping(key, optional=True)
    if wire is None:
        return None
    array = array_from_wire(wire)
    if array.dtype.kind != "f":
        raise DecodeError(f"{key} must hold floating-point values")
    return array.astype(np.float32)


# --- Job ----------------------------------------------------------------------------------
def params_to_wire(p: JobParams) -> WireMap:
    if isinstance(p, FinetuneParams):
        return {
            "method": p.method,
            "epochs": p.epochs,
            "lr": float(p.lr),
            "batch_size": p.batch_size,
            "rank": p.rank,
            "seed": p.seed,
            "max_samples": p.max_samples,
            "steps": p.steps,
            "start_version": p.start_version,
        }
    if isinstance(p, ApplyAdapterParams):
        return {"adapter_version": p.adapter_version, "only_if_better": p.only_if_better}
    if isinstance(p, EvaluateParams):
        return {"adapter_version": p.adapter_version}
    if isinstance(p, CancelParams):
        return {"target_job_id": p.target_job_id}
    return {}


def params_from_wire(kind: JobKind, f: Fields) -> JobParams:
    if kind is JobKind.FINETUNE:
        return FinetuneParams(
            method=f.text("method"),
            epochs=f.integer("epochs"),
            lr=f.number("lr"),
            batch_size=f.integer("batch_size"),
            rank=f.integer("rank"),
            seed=f.integer("seed"),
            max_samples=f.integer("max_samples", optional=True),
            steps=f.integer("steps", optional=True),
            start_version=f.integer("start_version", optional=True),
        )
    if kind is JobKind.EVALUATE:
        return EvaluateParams(adapter_version=f.integer("adapter_version", optional=True))
    if kind is JobKind.APPLY_ADAPTER:
        return ApplyAdapterParams(
            adapter_version=f.integer("adapter_version"),
            only_if_better=bool(f.boolean("only_if_better", optional=True)),
        )
    if kind is JobKind.CANCEL:
        return CancelParams(target_job_id=f.text("target_job_id"))
    return RollbackAdapterParams()


def job_to_wire(m: Job) -> WireMap:
    return {
        "job_id": m.job_id,
        "kind": m.kind.value,
        "params": params_to_wire(m.params),
        "expires_at": float(m.expires_at),
        "base_model_hash": m.base_model_hash,
    }


def job_from_wire(f: Fields) -> Job:
    """Once the job id is readable, errors carry it and a JobReason so the device can answer
    REJECTED instead of dropping the command silently."""
    job_id = f.text("job_id")
    try:
        checks.token(job_id, "job_id")
    except ValueError as exc:
        raise DecodeError(str(exc)) from None

    def rejected(exc: Exception, reason: JobReason) -> DecodeError:
        return DecodeError(f"job {job_id}: {exc}", job_id=job_id, job_reason=reason)

    try:
        kind = f.choice("kind", JobKind)
    except DecodeError as exc:
        raise rejected(exc, JobReason.UNKNOWN_KIND) from None
    try:
        params = params_from_wire(kind, Fields(f.mapping("params"), f"{kind} params"))
    except (DecodeError, ValueError) as exc:
        raise rejected(exc, JobReason.INVALID_PARAMS) from None
    try:
        return Job(
            job_id=job_id,
            kind=kind,
            params=params,
            expires_at=f.number("expires_at"),
            base_model_hash=f.text("base_model_hash", optional=True),
        )
    except (DecodeError, ValueError) as exc:
        raise rejected(exc, JobReason.MALFORMED) from None


# --- JobStatus ----------------------------------------------------------------------------
def job_status_to_wire(m: JobStatus) -> WireMap:
    return {
        "job_id": m.job_id,
        "state": m.state.value,
        "progress": float(m.progress),
        "reason": m.reason,
        "reason_code": None if m.reason_code is None else m.reason_code.value,
        "detail": dict(m.detail),
    }


def job_status_from_wire(f: Fields) -> JobStatus:
    return JobStatus(
        job_id=f.text("job_id"),
        state=f.choice("state", JobState),
        progress=f.number("progress"),
        reason=f.text("reason", optional=True),
        reason_code=f.choice("reason_code", JobReason, optional=True),
        detail=f.mapping("detail"),
    )


# --- Report -------------------------------------------------------------------------------
def metrics_to_wire(m: ReportMetrics) -> WireMap:
    return {
        "accuracy_before": float(m.accuracy_before),
        "accuracy_after": float(m.accuracy_after),
        "samples": m.samples,
        "epochs": m.epochs,
        "finetune_seconds": float(m.finetune_seconds),
        "joules": float(m.joules),
        "power_source": m.power_source,
        "cache_hit_rate": float(m.cache_hit_rate),
        "base_model_hash": m.base_model_hash,
        "method": m.method,
        "rank": m.rank,
        "accuracy_running": m.accuracy_running,
        "installed": m.installed,
        "holdout_samples": m.holdout_samples,
        "steps": m.steps,
        "loss_before": m.loss_before,
        "loss_after": m.loss_after,
    }


def metrics_from_wire(f: Fields) -> ReportMetrics:
    return ReportMetrics(
        accuracy_before=f.number("accuracy_before"),
        accuracy_after=f.number("accuracy_after"),
        samples=f.integer("samples"),
        epochs=f.integer("epochs"),
        finetune_seconds=f.number("finetune_seconds"),
        joules=f.number("joules"),
        power_source=f.text("power_source"),
        cache_hit_rate=f.number("cache_hit_rate"),
        base_model_hash=f.text("base_model_hash"),
        method=f.text("method"),
        rank=f.integer("rank"),
        accuracy_running=f.number("accuracy_running", optional=True),
        installed=f.boolean("installed", optional=True),
        holdout_samples=f.integer("holdout_samples", optional=True),
        steps=f.integer("steps", optional=True),
        loss_before=f.number("loss_before", optional=True),
        loss_after=f.number("loss_after", optional=True),
    )


def report_to_wire(m: Report) -> WireMap:
    return {
        "job_id": m.job_id,
        "adapter": compress_arrays(m.adapter, m.encoding),
        "parent_adapter_version": m.parent_adapter_version,
        "metrics": metrics_to_wire(m.metrics),
    }


def report_from_wire(f: Fields) -> Report:
    adapter, encoding = decompress_arrays(f.mapping("adapter"))
    return Report(
        job_id=f.text("job_id"),
        adapter=adapter,
        metrics=metrics_from_wire(Fields(f.mapping("metrics"), "report metrics")),
        parent_adapter_version=f.integer("parent_adapter_version", optional=True),
        encoding=encoding,
    )


# --- AdapterPublication -------------------------------------------------------------------
def lineage_to_wire(m: Lineage) -> WireMap:
    return {
        "round_id": m.round_id,
        "device_ids": list(m.device_ids),
        "algorithm": m.algorithm,
        "parent_version": m.parent_version,
    }


def lineage_from_wire(f: Fields) -> Lineage:
    return Lineage(
        round_id=f.text("round_id"),
        device_ids=tuple(f.sequence("device_ids")),
        algorithm=f.text("algorithm"),
        parent_version=f.integer("parent_version", optional=True),
    )


# A publication's wire form, kept while the publication lives: the coordinator sends the same
# one inline in every device's desired pointer of a hand-out (a thousand conversions of its
# arrays, ~30 µs each, otherwise). A publication (frozen, its arrays never changed once built) is
# hashed by identity (eq=False).
_ADAPTER_WIRE: weakref.WeakKeyDictionary[AdapterPublication, WireMap] = weakref.WeakKeyDictionary()


def adapter_to_wire(m: AdapterPublication) -> WireMap:
    wire = _ADAPTER_WIRE.get(m)
    if wire is None:
        wire = {
            "version": m.version,
            "base_model_hash": m.base_model_hash,
            "cohort": m.cohort,
            "arrays": compress_arrays(m.arrays, m.encoding),
            "lineage": lineage_to_wire(m.lineage),
            "created_at": float(m.created_at),
        }
        _ADAPTER_WIRE[m] = wire
    return wire


def adapter_from_wire(f: Fields) -> AdapterPublication:
    arrays, encoding = decompress_arrays(f.mapping("arrays"))
    return AdapterPublication(
        version=f.integer("version"),
        base_model_hash=f.text("base_model_hash"),
        cohort=f.text("cohort"),
        arrays=arrays,
        lineage=lineage_from_wire(Fields(f.mapping("lineage"), "lineage")),
        created_at=f.number("created_at"),
        encoding=encoding,
    )


# --- DesiredState, FetchRequest, Chunk ----------------------------------------------------
def desired_to_wire(m: DesiredState) -> WireMap:
    wire: WireMap = {
        "adapter_version": m.adapter_version,
        "base_model_hash": m.base_model_hash,
        "cohort": m.cohort,
        "only_if_better": m.only_if_better,
    }
    if m.adapter is not None:
        wire["adapter"] = adapter_to_wire(m.adapter)
    if m.job_id is not None:
        wire["job_id"], wire["expires_at"] = m.job_id, m.expires_at
    return wire


def desired_from_wire(f: Fields) -> DesiredState:
    adapter = f.mapping("adapter", optional=True)
    return DesiredState(
        adapter_version=f.integer("adapter_version", optional=True),
        base_model_hash=f.text("base_model_hash"),
        cohort=f.text("cohort"),
        only_if_better=bool(f.boolean("only_if_better", optional=True)),
        adapter=None if adapter is None else adapter_from_wire(Fields(adapter, "inline adapter")),
        job_id=f.text("job_id", optional=True),
        expires_at=f.number("expires_at", optional=True),
    )


def adapter_wire_bytes(publication: AdapterPublication) -> int:
    """The encoded size of an adapter inside a pointer (see INLINE_ADAPTER_MAX_BYTES)."""
    return len(pack(adapter_to_wire(publication)))


def fetch_to_wire(m: FetchRequest) -> WireMap:
    return {"adapter_version": m.adapter_version}


def fetch_from_wire(f: Fields) -> FetchRequest:
    return FetchRequest(adapter_version=f.integer("adapter_version"))


def chunk_to_wire(m: Chunk) -> WireMap:
    return {
        "message_id": m.message_id,
        "index": m.index,
        "total": m.total,
        "sha256": m.sha256,
        "data": m.data,
    }


def chunk_from_wire(f: Fields) -> Chunk:
    return Chunk(
        message_id=f.text("message_id"),
        index=f.integer("index"),
        total=f.integer("total"),
        sha256=f.blob("sha256"),
        data=f.blob("data"),
    )


_CODECS: dict[MessageKind, tuple[Callable[..., WireMap], Callable[[Fields], Message]]] = {
    MessageKind.PRESENCE: (presence_to_wire, presence_from_wire),
    MessageKind.HEARTBEAT: (heartbeat_to_wire, heartbeat_from_wire),
    MessageKind.JOB: (job_to_wire, job_from_wire),
    MessageKind.JOB_STATUS: (job_status_to_wire, job_status_from_wire),
    MessageKind.REPORT: (report_to_wire, report_from_wire),
    MessageKind.ADAPTER: (adapter_to_wire, adapter_from_wire),
    MessageKind.DESIRED: (desired_to_wire, desired_from_wire),
    MessageKind.FETCH: (fetch_to_wire, fetch_from_wire),
    MessageKind.CHUNK: (chunk_to_wire, chunk_from_wire),
}


# --- Envelope -----------------------------------------------------------------------------
def new_envelope(message: Message, *, sender: str, **headers: Any) -> Envelope:
    """An Envelope with a fresh id and timestamp; a Job's expiry becomes the envelope's."""
    if headers.get("expires_at") is None and isinstance(message, Job):
        headers["expires_at"] = message.expires_at
    return Envelope(message, sender=sender, **headers)


def encode_envelope(envelope: Envelope) -> bytes:
    to_wire, _ = _CODECS[envelope.kind]
    wire: WireMap = {
        "schema": SCHEMA_VERSION,
        "kind": envelope.kind.value,
        "id": envelope.message_id,
        "sender": envelope.sender,
        "sent_at": float(envelope.sent_at),
    }
    for name in _OPTIONAL_HEADERS:
        if (value := getattr(envelope, name)) is not None:
            wire[name] = value
    wire["body"] = to_wire(envelope.message)
    return pack(wire)


def encode(message: Message, *, sender: str, **headers: Any) -> bytes:
    """Message -> bytes. Headers: message_id, sent_at, expires_at, reply_to, correlation_id,
    boot_id, seq (boot_id and seq are required for messages sent by devices)."""
    return encode_envelope(new_envelope(message, sender=sender, **headers))


def _check_schema(f: Fields) -> None:
    schema = f.integer("schema")
    if schema != SCHEMA_VERSION:
        raise DecodeError(
            f"unsupported schema version {schema} (this build speaks {SCHEMA_VERSION})"
        )


def _envelope_from_wire(f: Fields) -> Envelope:
    _check_schema(f)
    kind = f.choice("kind", MessageKind)
    _, from_wire = _CODECS[kind]
    return Envelope(
        message=from_wire(Fields(f.mapping("body"), f"{kind} body")),
        sender=f.text("sender"),
        message_id=f.text("id"),
        sent_at=f.number("sent_at"),
        expires_at=f.number("expires_at", optional=True),
        reply_to=f.text("reply_to", optional=True),
        correlation_id=f.text("correlation_id", optional=True),
        boot_id=f.text("boot_id", optional=True),
        seq=f.integer("seq", optional=True),
    )


def decode(data: bytes | bytearray, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Envelope:
    """Bytes -> Envelope with a typed `.message`. Raises DecodeError and nothing else."""
    obj = unpack(data, max_bytes=max_bytes)
    try:
        return _envelope_from_wire(Fields(obj, "envelope"))
    except DecodeError:
        raise
    except ValueError as exc:  # a message's own validation (ranges, patterns)
        raise DecodeError(f"invalid message: {exc}") from None
