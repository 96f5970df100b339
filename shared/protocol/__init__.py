"""The skipfleet wire protocol: typed messages, their msgpack codec, chunking and array encodings.

Typical use:
    outgoing = encode_for_publish(report, sender=device_id, boot_id=boot, seq=next_seq)
    for item in outgoing: client.publish(topic, item.payload, qos=1)

    envelope = reassembler.feed(decode(msg.payload))  # DecodeError is the only error to catch
"""

from shared.protocol.arrays import (
    ALLOWED_DTYPES,
    array_from_wire,
    array_to_wire,
    compress_arrays,
    decompress_arrays,
)
from shared.protocol.chunking import (
    DEFAULT_CHUNK_LIMIT,
    Outgoing,
    Reassembler,
    SenderReassemblers,
    encode_for_publish,
    split_envelope,
)
from shared.protocol.codec import (
    MAX_MESSAGE_BYTES,
    decode,
    encode,
    encode_envelope,
    new_envelope,
)
from shared.protocol.enums import (
    DEVICE_KINDS,
    DEVICE_SETTABLE,
    TERMINAL_STATES,
    AdapterOrigin,
    ArrayEncoding,
    JobKind,
    JobReason,
    JobState,
    MessageKind,
    PresenceState,
)
from shared.protocol.envelope import SCHEMA_VERSION, Envelope, kind_of, new_message_id
from shared.protocol.errors import DecodeError, EncodeError, ProtocolError, ReassemblyError
from shared.protocol.messages import (
    BASE_MODEL_VERSION,
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
from shared.protocol.routing import TOPIC_OF_KIND, check_route, topic_kind_for

__all__ = [
    "ALLOWED_DTYPES",
    "BASE_MODEL_VERSION",
    "DEFAULT_CHUNK_LIMIT",
    "DEVICE_KINDS",
    "DEVICE_SETTABLE",
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "TERMINAL_STATES",
    "TOPIC_OF_KIND",
    "AdapterOrigin",
    "AdapterPublication",
    "ApplyAdapterParams",
    "ArrayEncoding",
    "CancelParams",
    "Chunk",
    "DecodeError",
    "DesiredState",
    "EncodeError",
    "Envelope",
    "EvaluateParams",
    "FetchRequest",
    "FinetuneParams",
    "Heartbeat",
    "Job",
    "JobKind",
    "JobParams",
    "JobReason",
    "JobState",
    "JobStatus",
    "Lineage",
    "Message",
    "MessageKind",
    "Outgoing",
    "Presence",
    "PresenceState",
    "ProtocolError",
    "Reassembler",
    "ReassemblyError",
    "Report",
    "ReportMetrics",
    "RollbackAdapterParams",
    "SenderReassemblers",
    "array_from_wire",
    "array_to_wire",
    "check_route",
    "compress_arrays",
    "decode",
    "decompress_arrays",
    "encode",
    "encode_envelope",
    "encode_for_publish",
    "kind_of",
    "new_envelope",
    "new_message_id",
    "split_envelope",
    "topic_kind_for",
]
