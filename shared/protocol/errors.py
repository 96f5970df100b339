"""The protocol's exceptions: everything a receiver must catch is a DecodeError."""

from __future__ import annotations

from shared.protocol.enums import JobReason


class ProtocolError(Exception):
    """Base of every error raised by shared.protocol."""


class EncodeError(ProtocolError, ValueError):
    """A message cannot be put on the wire (too large, not encodable)."""


class DecodeError(ProtocolError):
    """Bytes from the wire are malformed, oversized, hostile or of an unknown schema.

    `job_id` and `job_reason` are filled in when a job command was readable enough to answer
    with a REJECTED status instead of dropping it silently.
    """

    def __init__(
        self, message: str, *, job_id: str | None = None, job_reason: JobReason | None = None
    ) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.job_reason = job_reason


class ReassemblyError(DecodeError):
    """Chunks that do not add up: inconsistent headers, a sha256 mismatch, or over the bounds."""
