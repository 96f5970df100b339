"""The typed vocabularies of the wire protocol. Their values are what travels on the wire."""

from __future__ import annotations

from enum import StrEnum


class MessageKind(StrEnum):
    PRESENCE = "presence"
    HEARTBEAT = "heartbeat"
    JOB = "job"
    JOB_STATUS = "job_status"
    REPORT = "report"
    ADAPTER = "adapter"
    DESIRED = "desired"
    FETCH = "fetch"
    CHUNK = "chunk"


# Sent by devices: their envelopes carry (boot_id, seq) so the coordinator can drop duplicates.
DEVICE_KINDS = frozenset(
    {
        MessageKind.PRESENCE,
        MessageKind.HEARTBEAT,
        MessageKind.JOB_STATUS,
        MessageKind.REPORT,
        MessageKind.FETCH,
    }
)


class PresenceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class JobKind(StrEnum):
    FINETUNE = "finetune"
    EVALUATE = "evaluate"
    APPLY_ADAPTER = "apply_adapter"
    ROLLBACK_ADAPTER = "rollback_adapter"
    CANCEL = "cancel"  # carried out on arrival by the device, never queued behind its target


class JobState(StrEnum):
    """The AWS IoT Jobs life cycle."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMED_OUT = "timed_out"
    CANCELED = "canceled"
    REMOVED = "removed"


# The device may set only these; the coordinator owns the rest (timeouts included).
DEVICE_SETTABLE = frozenset(
    {JobState.IN_PROGRESS, JobState.SUCCEEDED, JobState.FAILED, JobState.REJECTED}
)
TERMINAL_STATES = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.REJECTED,
        JobState.TIMED_OUT,
        JobState.CANCELED,
        JobState.REMOVED,
    }
)


class JobReason(StrEnum):
    """Why a device rejected (or failed) a job: machine-readable, beside the free-text reason."""

    MALFORMED = "malformed"
    EXPIRED = "expired"
    DUPLICATE = "duplicate"
    UNKNOWN_KIND = "unknown_kind"
    BUSY = "busy"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    INVALID_PARAMS = "invalid_params"
    CANCELED = "canceled"
    NOTHING_TO_CANCEL = "nothing_to_cancel"  # a cancel's target is unknown or already finished
    ADAPTER_UNAVAILABLE = "adapter_unavailable"
    INSUFFICIENT_DATA = "insufficient_data"
    INTERNAL_ERROR = "internal_error"
    DISK_FULL = "disk_full"  # the device could not write the job's state (or its results)


class ArrayEncoding(StrEnum):
    """How adapter arrays travel: float32 as is, float16, or int8 with per-column scales."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"


class AdapterOrigin(StrEnum):
    """Where the adapter a device runs came from."""

    BASE = "base"  # no adapter: the base model alone
    PERSONAL = "personal"  # fine-tuned on this device (possibly from a fleet adapter)
    FLEET = "fleet"  # a coordinator version (a cluster's or the cohort's aggregate)
