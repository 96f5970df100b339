"""The message kinds as frozen dataclasses. Construction validates types and ranges, so a message
decoded from the wire is as trustworthy as one built locally.

Dataclasses holding numpy arrays (Report, AdapterPublication) compare by identity (eq=False):
element-wise `==` on arrays has no single truth value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from shared.protocol import checks
from shared.protocol.checks import Scalar
from shared.protocol.enums import (
    DEVICE_SETTABLE,
    TERMINAL_STATES,
    AdapterOrigin,
    ArrayEncoding,
    JobKind,
    JobReason,
    JobState,
    PresenceState,
)
from shared.topics import validate_device_id

MAX_CHUNKS = 4096
MAX_LINEAGE_DEVICES = 10_000
MAX_SIGNATURE_WIDTH = 4096


def _optional(check: Callable[..., None], value: object, *args: object) -> None:
    if value is not None:
        check(value, *args)


def _enum(value: object, enum_type: type, what: str) -> None:
    if not isinstance(value, enum_type):
        raise ValueError(f"{what} must be a {enum_type.__name__}, got {value!r}")


@dataclass(frozen=True)
class Presence:
    """Retained on `status`: online after CONNACK, offline as Last Will and on clean shutdown."""

    state: PresenceState
    boot_id: str
    agent_version: str
    base_model_hash: str
    cohort: str
    device: Mapping[str, Scalar] = field(default_factory=dict)  # hostname, arch, cpus, model...
    # Labelled rows the device trains on and holds out to measure accuracy. 0 and 0: a device
    # without labels (it can neither fine-tune nor measure; it runs what its cluster runs).
    # None: an agent too old to say.
    train_samples: int | None = None
    holdout_samples: int | None = None

    def __post_init__(self) -> None:
        _enum(self.state, PresenceState, "state")
        for name in ("boot_id", "agent_version", "base_model_hash", "cohort"):
            checks.token(getattr(self, name), name)
        checks.scalar_map(self.device, "device")
        _optional(checks.integer, self.train_samples, "train_samples")
        _optional(checks.integer, self.holdout_samples, "holdout_samples")

    @property
    def labelled(self) -> bool | None:
        """Whether the device can fine-tune and measure accuracy (None: not said)."""
        if self.train_samples is None or self.holdout_samples is None:
            return None
        return self.train_samples > 0 and self.holdout_samples > 0


@dataclass(frozen=True)
class Heartbeat:
    """Periodic telemetry on `telemetry` (QoS 0)."""

    power_w: float
    power_source: str  # "ina219", "rapl", "hwmon[:<chip>]" or "model:<profile>"
    energy_j_total: float
    cache_bytes: int
    spool_depth: int
    spool_dropped: int
    uptime_s: float
    temperature_c: float | None = None
    drift_score: float | None = None
    adapter_version: int | None = None
    busy_job_id: str | None = None
    drifted: bool | None = None  # a simulated device switched to its drifted data
    # Label-free drift scores over the recent inputs, each divided by the threshold calibrated
    # for the base model on its own in-distribution data: above 1, beyond what that data shows.
    confidence_score: float | None = None  # mean (1 − max softmax), with the running adapter
    feature_score: float | None = None  # mean Mahalanobis distance on the last hidden layer
    # Where the inputs sit: the mean of the last hidden layer's activations over the recent
    # inputs, standardised by the base model's in-distribution statistics (a float vector).
    signature: np.ndarray | None = field(default=None, compare=False)
    signature_rows: int | None = None  # how many input rows `signature` averages
    adapter_origin: AdapterOrigin | None = None
    # Device clock minus coordinator clock (s), estimated from the sent times of the commands it
    # received (agent/clock_offset.py); None before any, or from an agent too old to say.
    clock_offset_s: float | None = None

    def __post_init__(self) -> None:
        checks.number(self.power_w, "power_w", 0.0)
        checks.token(self.power_source, "power_source", checks.POWER_SOURCE)
        checks.number(self.energy_j_total, "energy_j_total", 0.0)
        for name in ("cache_bytes", "spool_depth", "spool_dropped"):
            checks.integer(getattr(self, name), name)
        checks.number(self.uptime_s, "uptime_s", 0.0)
        _optional(checks.number, self.temperature_c, "temperature_c", -100.0, 200.0)
        _optional(checks.number, self.drift_score, "drift_score")
        _optional(checks.integer, self.adapter_version, "adapter_version")
        _optional(checks.token, self.busy_job_id, "busy_job_id")
        _optional(checks.boolean, self.drifted, "drifted")
        _optional(checks.number, self.confidence_score, "confidence_score", 0.0)
        _optional(checks.number, self.feature_score, "feature_score", 0.0)
        _optional(checks.vector, self.signature, "signature", MAX_SIGNATURE_WIDTH)
        _optional(checks.integer, self.signature_rows, "signature_rows", 1)
        if (self.signature is None) != (self.signature_rows is None):
            raise ValueError("signature and signature_rows come together")
        _optional(_enum, self.adapter_origin, AdapterOrigin, "adapter_origin")
        _optional(checks.number, self.clock_offset_s, "clock_offset_s")


@dataclass(frozen=True)
class FinetuneParams:
    """Hyper-parameters of `agent.trainer.finetune.finetune` (same names and defaults)."""

    epochs: int
    lr: float
    seed: int
    method: str = "skip2-lora"
    batch_size: int = 20
    rank: int = 4
    max_samples: int | None = None  # None: all the device's training data
    # A budget of SGD steps (batches): when set, training runs exactly this many (as many
    # epochs as that takes) and `epochs` is not used. 10 samples x 30 epochs is 30 steps;
    # 470 samples x 30 epochs, 720: a step budget gives every device the same local work.
    steps: int | None = None
    # What training starts from: None the adapter the device runs now, BASE_MODEL_VERSION (0)
    # the base model alone, v >= 1 the fleet version v (fetched if the device lacks it).
    start_version: int | None = None

    def __post_init__(self) -> None:
        checks.integer(self.epochs, "epochs", 1, 10_000)
        checks.number(self.lr, "lr", 0.0, 10.0)
        if self.lr == 0:
            raise ValueError("lr must be positive")
        checks.integer(self.seed, "seed")
        checks.token(self.method, "method", checks.METHOD)
        checks.integer(self.batch_size, "batch_size", 1, 65_536)
        checks.integer(self.rank, "rank", 1, 1024)
        _optional(checks.integer, self.max_samples, "max_samples", 1)
        _optional(checks.integer, self.steps, "steps", 1, 10_000_000)
        _optional(checks.integer, self.start_version, "start_version")


# Fleet adapter versions count from 1; 0 names "no adapter, the base model alone" (evaluations).
BASE_MODEL_VERSION = 0


@dataclass(frozen=True)
class EvaluateParams:
    # None: the adapter the device runs now; BASE_MODEL_VERSION: the base model alone
    adapter_version: int | None = None

    def __post_init__(self) -> None:
        _optional(checks.integer, self.adapter_version, "adapter_version")


@dataclass(frozen=True)
class ApplyAdapterParams:
    adapter_version: int
    # Install only if it measures strictly better on the device's own hold-out than what the
    # device runs now (personal, fleet or the base model); otherwise keep running that.
    only_if_better: bool = False

    def __post_init__(self) -> None:
        checks.integer(self.adapter_version, "adapter_version")
        checks.boolean(self.only_if_better, "only_if_better")


@dataclass(frozen=True)
class RollbackAdapterParams:
    """Go back to the adapter that ran before the current one (a chosen version is APPLY)."""


@dataclass(frozen=True)
class CancelParams:
    """Cancel another job of this device: FAILED if it runs, REJECTED if it still waits."""

    target_job_id: str

    def __post_init__(self) -> None:
        checks.token(self.target_job_id, "target_job_id")


JobParams = (
    FinetuneParams | EvaluateParams | ApplyAdapterParams | RollbackAdapterParams | CancelParams
)
PARAMS_BY_KIND: dict[JobKind, type] = {
    JobKind.FINETUNE: FinetuneParams,
    JobKind.EVALUATE: EvaluateParams,
    JobKind.APPLY_ADAPTER: ApplyAdapterParams,
    JobKind.ROLLBACK_ADAPTER: RollbackAdapterParams,
    JobKind.CANCEL: CancelParams,
}


@dataclass(frozen=True)
class Job:
    """A command on `cmd/job`. A stale (expired) or repeated job id is rejected, not run twice."""

    job_id: str
    kind: JobKind
    params: JobParams
    expires_at: float  # unix seconds
    base_model_hash: str | None = None  # set: the device rejects with BASE_MODEL_MISMATCH

    def __post_init__(self) -> None:
        checks.token(self.job_id, "job_id")
        _enum(self.kind, JobKind, "kind")
        if type(self.params) is not PARAMS_BY_KIND[self.kind]:
            raise ValueError(f"{self.kind} job needs {PARAMS_BY_KIND[self.kind].__name__}")
        checks.number(self.expires_at, "expires_at", 0.0)
        _optional(checks.token, self.base_model_hash, "base_model_hash")

    def is_expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at


@dataclass(frozen=True)
class JobStatus:
    """A device's job update on `job`; the coordinator owns QUEUED, TIMED_OUT, CANCELED, REMOVED."""

    job_id: str
    state: JobState
    progress: float = 0.0  # 0..1
    reason: str | None = None  # free text for people
    reason_code: JobReason | None = None  # required with REJECTED
    detail: Mapping[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.token(self.job_id, "job_id")
        _enum(self.state, JobState, "state")
        if self.state not in DEVICE_SETTABLE:
            raise ValueError(f"a device may not set job state {self.state}")
        checks.fraction(self.progress, "progress")
        _optional(checks.text, self.reason, "reason")
        _optional(_enum, self.reason_code, JobReason, "reason_code")
        if self.state is JobState.REJECTED and self.reason_code is None:
            raise ValueError("a REJECTED status needs a reason_code")
        checks.scalar_map(self.detail, "detail")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class ReportMetrics:
    accuracy_before: float  # on the device's own hold-out, 0..1
    accuracy_after: float
    samples: int  # training samples: the aggregation weight
    epochs: int
    finetune_seconds: float
    joules: float
    power_source: str
    cache_hit_rate: float
    base_model_hash: str
    method: str
    rank: int
    # accuracy_before is the hold-out accuracy of what training started from; this is the one
    # of what the device ran when the job started (they differ when it started from a fleet
    # version), and whether it runs the new adapter now (it must measure strictly better).
    accuracy_running: float | None = None
    installed: bool | None = None
    holdout_samples: int | None = None
    steps: int | None = None  # SGD steps run
    # Mean hold-out cross-entropy of the start adapter and of the result (nats): a federated
    # run goes on while aggregates lower it, also where accuracy on a few rows is saturated.
    loss_before: float | None = None
    loss_after: float | None = None

    def __post_init__(self) -> None:
        checks.fraction(self.accuracy_before, "accuracy_before")
        checks.fraction(self.accuracy_after, "accuracy_after")
        checks.integer(self.samples, "samples", 1)
        checks.integer(self.epochs, "epochs")
        checks.number(self.finetune_seconds, "finetune_seconds", 0.0)
        checks.number(self.joules, "joules", 0.0)
        checks.token(self.power_source, "power_source", checks.POWER_SOURCE)
        checks.fraction(self.cache_hit_rate, "cache_hit_rate")
        checks.token(self.base_model_hash, "base_model_hash")
        checks.token(self.method, "method", checks.METHOD)
        checks.integer(self.rank, "rank", 1, 1024)
        _optional(checks.fraction, self.accuracy_running, "accuracy_running")
        _optional(checks.boolean, self.installed, "installed")
        _optional(checks.integer, self.holdout_samples, "holdout_samples")
        _optional(checks.integer, self.steps, "steps")
        _optional(checks.number, self.loss_before, "loss_before", 0.0)
        _optional(checks.number, self.loss_after, "loss_after", 0.0)


@dataclass(frozen=True, eq=False)
class Report:
    """A fine-tune result on `report`: the trained adapter (`Adapter.to_arrays()`) and metrics."""

    job_id: str
    adapter: Mapping[str, np.ndarray]
    metrics: ReportMetrics
    parent_adapter_version: int | None = None
    encoding: ArrayEncoding = ArrayEncoding.FLOAT32  # how `adapter` travels

    def __post_init__(self) -> None:
        checks.token(self.job_id, "job_id")
        checks.float_arrays(self.adapter, "adapter")
        if not isinstance(self.metrics, ReportMetrics):
            raise ValueError("metrics must be ReportMetrics")
        _optional(checks.integer, self.parent_adapter_version, "parent_adapter_version")
        _enum(self.encoding, ArrayEncoding, "encoding")


@dataclass(frozen=True)
class Lineage:
    """Where an aggregated adapter came from."""

    round_id: str
    device_ids: tuple[str, ...]
    algorithm: str
    parent_version: int | None = None

    def __post_init__(self) -> None:
        checks.token(self.round_id, "round_id")
        if not isinstance(self.device_ids, tuple) or len(self.device_ids) > MAX_LINEAGE_DEVICES:
            raise ValueError(f"device_ids must be a tuple of at most {MAX_LINEAGE_DEVICES}")
        for device_id in self.device_ids:
            validate_device_id(device_id)
        checks.token(self.algorithm, "algorithm")
        _optional(checks.integer, self.parent_version, "parent_version")


@dataclass(frozen=True, eq=False)
class AdapterPublication:
    """A fleet adapter version on `cmd/adapter` (chunked when large)."""

    version: int
    base_model_hash: str
    cohort: str
    arrays: Mapping[str, np.ndarray]
    lineage: Lineage
    created_at: float  # unix seconds
    encoding: ArrayEncoding = ArrayEncoding.FLOAT32

    def __post_init__(self) -> None:
        checks.integer(self.version, "version")
        checks.token(self.base_model_hash, "base_model_hash")
        checks.token(self.cohort, "cohort")
        checks.float_arrays(self.arrays, "arrays")
        if not isinstance(self.lineage, Lineage):
            raise ValueError("lineage must be Lineage")
        checks.number(self.created_at, "created_at", 0.0)
        _enum(self.encoding, ArrayEncoding, "encoding")


# An adapter travels inside the retained pointer only up to this size (its encoded arrays,
# lineage and metadata): the broker keeps one retained pointer per device, and a retained
# message is never chunked. Larger ones are fetched (FetchRequest, answered on `cmd/adapter`).
INLINE_ADAPTER_MAX_BYTES = 32 * 1024


@dataclass(frozen=True)
class DesiredState:
    """Retained on `cmd/desired`: which adapter the device should run (None: the base model).

    With `adapter`, the version itself comes along (a device need not fetch it). With `job_id`,
    the pointer is also an offer the device answers: an APPLY_ADAPTER job of that id (see
    `apply_job`), run while the offer has not expired and the device has not seen that id yet;
    its one terminal JobStatus is the answer. A pointer without a job id, or one the device
    already answered (re-delivered at every reconnect), is reconciled without an answer.
    """

    adapter_version: int | None
    base_model_hash: str
    cohort: str
    # The device's own choice: take the version only if it measures strictly better on the
    # device's hold-out than what it runs (a device with labels); otherwise take it as is.
    only_if_better: bool = False
    adapter: AdapterPublication | None = field(default=None, compare=False)
    job_id: str | None = None
    expires_at: float | None = None  # unix seconds: when the offer (not the pointer) lapses

    def __post_init__(self) -> None:
        _optional(checks.integer, self.adapter_version, "adapter_version")
        checks.token(self.base_model_hash, "base_model_hash")
        checks.token(self.cohort, "cohort")
        checks.boolean(self.only_if_better, "only_if_better")
        if self.adapter is not None:
            self._check_adapter(self.adapter)
        _optional(checks.token, self.job_id, "job_id")
        _optional(checks.number, self.expires_at, "expires_at", 0.0)
        if (self.job_id is None) != (self.expires_at is None):
            raise ValueError("job_id and expires_at come together")
        if self.job_id is not None and self.adapter_version is None:
            raise ValueError("an offer (job_id) needs an adapter_version")

    def _check_adapter(self, adapter: AdapterPublication) -> None:
        if not isinstance(adapter, AdapterPublication):
            raise ValueError("adapter must be an AdapterPublication")
        if adapter.version != self.adapter_version:
            raise ValueError(f"adapter is version {adapter.version}, not {self.adapter_version}")
        if adapter.base_model_hash != self.base_model_hash:
            raise ValueError("adapter is for another base model than the pointer")

    def apply_job(self) -> Job | None:
        """The APPLY_ADAPTER job this pointer offers (None: a plain pointer)."""
        if self.job_id is None or self.expires_at is None or self.adapter_version is None:
            return None
        params = ApplyAdapterParams(self.adapter_version, only_if_better=self.only_if_better)
        return Job(
            self.job_id, JobKind.APPLY_ADAPTER, params, self.expires_at, self.base_model_hash
        )


@dataclass(frozen=True)
class FetchRequest:
    """A device asks on `fetch` for an adapter version; the answer comes on `cmd/adapter`."""

    adapter_version: int

    def __post_init__(self) -> None:
        checks.integer(self.adapter_version, "adapter_version")


@dataclass(frozen=True)
class Chunk:
    """One piece of an encoded envelope too large for one publish (see shared.protocol.chunking)."""

    message_id: str  # the id of the envelope being carried
    index: int
    total: int
    sha256: bytes  # of the whole encoded envelope
    data: bytes

    def __post_init__(self) -> None:
        checks.token(self.message_id, "message_id", checks.MESSAGE_ID)
        checks.integer(self.total, "total", 1, MAX_CHUNKS)
        checks.integer(self.index, "index", 0, self.total - 1)
        if not isinstance(self.sha256, bytes) or len(self.sha256) != 32:
            raise ValueError("sha256 must be 32 bytes")
        if not isinstance(self.data, bytes) or not self.data:
            raise ValueError("data must be non-empty bytes")


Message = (
    Presence
    | Heartbeat
    | Job
    | JobStatus
    | Report
    | AdapterPublication
    | DesiredState
    | FetchRequest
    | Chunk
)
