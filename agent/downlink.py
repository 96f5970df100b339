"""Commands from the coordinator: decoded, checked, and handed over without blocking.

Runs on the MQTT worker (agent.handoff), never on paho's network thread; it decodes and
hands over without waiting for a job: jobs go to the job runner,
adapter publications (possibly chunked) to the adapter inbox, desired-state pointers to the
reconciler (agent.reconcile), the adapter a pointer carries inline to the inbox first. Each
command's sent time feeds the clock offset estimate (agent.clock_offset) before the command is
judged. A job command that cannot be accepted is answered with a REJECTED status whenever its
job id can be read, so the coordinator learns why instead of waiting for a timeout. A job id
seen before is the coordinator asking again: agent.repeats answers it (the kept result of a
finished job) before the runner.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.adapter_inbox import AdapterInbox
from agent.clock_offset import ClockOffset
from agent.jobs import JobRunner
from agent.repeats import RepeatedJobs
from shared.protocol import DEFAULT_CHUNK_LIMIT, DecodeError, Reassembler, check_route, decode
from shared.protocol.enums import JobReason
from shared.protocol.envelope import Envelope
from shared.protocol.messages import AdapterPublication, DesiredState, Job
from shared.topics import TopicKind, Topics

log = logging.getLogger(__name__)

# A job command is well under 1 KiB; anything much larger is refused before it is trusted.
JOB_MAX_BYTES = 16 * 1024
# No single publish may exceed this (chunks are at most DEFAULT_CHUNK_LIMIT): not even parsed.
PUBLISH_MAX_BYTES = 2 * DEFAULT_CHUNK_LIMIT


def decode_command(
    device_id: str,
    kind: TopicKind,
    payload: bytes,
    reassembler: Reassembler,
    on_envelope: Callable[[Envelope], None] = lambda envelope: None,
) -> Envelope | None:
    """A command for this device, checked (size, route, job size), or None until the last chunk
    of a chunked one is in. DecodeError for anything else (with the job id when it is readable).
    `on_envelope` sees every decoded, routed publish (each chunk too). Shared by the agent and
    the load generator."""
    envelope = decode(payload, max_bytes=PUBLISH_MAX_BYTES)
    check_route(device_id, kind, envelope)
    on_envelope(envelope)
    if kind is TopicKind.CMD_JOB and len(payload) > JOB_MAX_BYTES:
        job_id = envelope.message.job_id if isinstance(envelope.message, Job) else None
        raise DecodeError(
            f"job command of {len(payload)} bytes exceeds {JOB_MAX_BYTES}",
            job_id=job_id,
            job_reason=JobReason.MALFORMED,
        )
    return reassembler.feed(envelope)


class Downlink:
    def __init__(
        self,
        device_id: str,
        topics: Topics,
        *,
        runner: JobRunner,
        inbox: AdapterInbox,
        on_desired: Callable[[DesiredState], None] = lambda desired: None,
        reassembler: Reassembler | None = None,
        clock_offset: ClockOffset | None = None,
        repeats: RepeatedJobs | None = None,
    ):
        self._device_id = device_id
        self._topics = topics
        self._runner = runner
        self._inbox = inbox
        self._on_desired = on_desired
        self._reassembler = reassembler or Reassembler(max_in_flight=4)
        self._clock_offset = clock_offset or ClockOffset()
        self._repeats = repeats
        self.dropped = 0  # undecodable commands without a readable job id

    def handle(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """One publish; `retained`: the broker's stored copy, sent at some unknown past time."""
        try:
            device_id, kind = self._topics.parse(topic)
            if device_id != self._device_id:
                raise DecodeError(f"command for {device_id} arrived at {self._device_id}")
            envelope = self._decode(kind, payload, retained)
        except DecodeError as err:
            self._refuse(err)
            return
        if envelope is not None:
            self._dispatch(envelope, retained)

    def _decode(self, kind: TopicKind, payload: bytes, retained: bool) -> Envelope | None:
        def observe(envelope: Envelope) -> None:
            if not retained:
                self._clock_offset.observe(envelope.sent_at)

        return decode_command(self._device_id, kind, payload, self._reassembler, observe)

    def _refuse(self, err: DecodeError) -> None:
        if err.job_id is not None:
            log.warning("rejecting job %s: %s", err.job_id, err)
            self._runner.reject(err.job_id, err.job_reason or JobReason.MALFORMED, str(err))
            return
        self.dropped += 1
        log.warning("dropping an undecodable command: %s", err)

    def _dispatch(self, envelope: Envelope, retained: bool = False) -> None:
        message = envelope.message
        if isinstance(message, Job):
            if not self._answered_repeat(message):
                self._runner.submit(message)
        elif isinstance(message, AdapterPublication):
            log.info("adapter version %d received", message.version)
            self._inbox.put(message)
        elif isinstance(message, DesiredState):
            log.info("coordinator desires adapter version %s", message.adapter_version)
            if message.adapter is not None:  # carried inline: nothing to fetch
                self._inbox.put(message.adapter)
            offered = message.apply_job()
            if offered is not None and not retained:  # sent now, not the broker's stored copy:
                self._answered_repeat(offered)  # its offer may be the coordinator asking again
            self._on_desired(message)

    def _answered_repeat(self, job: Job) -> bool:
        return self._repeats is not None and self._repeats.answer(job)
