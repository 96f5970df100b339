"""A client that watches a fleet's topics and sends it jobs: for benchmarks, simulate and tests.

It subscribes to `{root}/#` with a persistent session, decodes (and reassembles) everything,
and lets the caller wait on a condition with a timeout instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from shared.mqtt import MqttSettings, connect_async, make_client
from shared.protocol import DecodeError, Reassembler, decode, encode, encode_for_publish
from shared.protocol.enums import JobState, PresenceState
from shared.protocol.envelope import Envelope
from shared.protocol.messages import Heartbeat, Job, JobStatus, Message, Presence, Report
from shared.topics import TopicKind, Topics

Match = Callable[[str, Envelope, bool], bool]  # (topic, envelope, retained) -> wanted?


class Received(NamedTuple):
    topic: str
    envelope: Envelope
    retained: bool
    arrival: float  # time.monotonic()


class FleetProbe:
    def __init__(
        self,
        settings: MqttSettings,
        client_id: str = "skipfleet-probe",
        topics: Topics | None = None,
    ):
        self.topics = topics = topics or Topics()
        self.client = make_client(settings, client_id)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.root}/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.received: list[Received] = []
        self.bytes_from_device: dict[str, int] = {}  # what each device put on the wire
        self._changed = threading.Condition()
        self._reassembler = Reassembler()
        connect_async(self.client, settings)
        self.client.loop_start()

    # ---------------------------------------------------------------- receiving
    def _on_message(self, client, userdata, message) -> None:
        self._count_bytes(message.topic, len(message.payload))
        try:
            envelope = self._reassembler.feed(decode(message.payload))
        except DecodeError:
            return  # someone else's garbage is not the probe's problem
        if envelope is not None:
            with self._changed:
                item = Received(message.topic, envelope, bool(message.retain), time.monotonic())
                self.received.append(item)
                self._changed.notify_all()

    def _count_bytes(self, topic: str, size: int) -> None:
        try:
            device, kind = self.topics.parse(topic)
        except ValueError:
            return
        if kind.from_device:
            self.bytes_from_device[device] = self.bytes_from_device.get(device, 0) + size

    def messages(self, kind: type) -> list[tuple[str, Envelope, float]]:
        """(device id, envelope, arrival) of every message of one type received so far."""
        with self._changed:
            items = list(self.received)
        return [
            (self.topics.parse(item.topic)[0], item.envelope, item.arrival)
            for item in items
            if isinstance(item.envelope.message, kind)
        ]

    def mark(self) -> int:
        """A point in what was received: `wait_for(..., after=mark)` looks only past it."""
        with self._changed:
            return len(self.received)

    def wait_for(self, match: Match, timeout: float, after: int = 0) -> tuple[Envelope, float]:
        """The first message matching (past `after`), and when it arrived."""
        return self._wait(match, timeout, after)

    def _wait(self, match: Match, timeout: float, after: int) -> tuple[Envelope, float]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for item in self.received[after:]:
                    if match(item.topic, item.envelope, item.retained):
                        return item.envelope, item.arrival
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    last = [
                        (i.topic, type(i.envelope.message).__name__) for i in self.received[-10:]
                    ]
                    raise TimeoutError(f"nothing matched within {timeout} s; last: {last}")
                self._changed.wait(remaining)

    def job_status(self, job_id: str, state: JobState, timeout: float) -> tuple[JobStatus, float]:
        envelope, arrival = self._wait(
            lambda t, e, r: (
                isinstance(e.message, JobStatus)
                and e.message.job_id == job_id
                and e.message.state is state
            ),
            timeout,
            0,
        )
        return envelope.message, arrival

    def job_succeeded(self, job_id: str, timeout: float) -> tuple[Message, float]:
        """The message that says a job SUCCEEDED (its status, or a fine-tune's report)."""

        def succeeded(message: Message) -> bool:
            if isinstance(message, Report):
                return message.job_id == job_id
            return (
                isinstance(message, JobStatus)
                and message.job_id == job_id
                and message.state is JobState.SUCCEEDED
            )

        envelope, arrival = self._wait(lambda t, e, r: succeeded(e.message), timeout, 0)
        return envelope.message, arrival

    def presence(self, state: PresenceState, timeout: float, retained: bool | None = None):
        return self._wait(
            lambda t, e, r: (
                isinstance(e.message, Presence)
                and e.message.state is state
                and (retained is None or r == retained)
            ),
            timeout,
            0,
        )[0].message

    def heartbeat(self, match: Callable[[Heartbeat], bool], timeout: float, after: int = 0):
        return self._wait(
            lambda t, e, r: isinstance(e.message, Heartbeat) and match(e.message), timeout, after
        )[0].message

    # ---------------------------------------------------------------- sending
    def send_job(self, device_id: str, job: Job | bytes, timeout: float = 10.0) -> float:
        """Publish a job (QoS 1, wait for PUBACK); returns when it was sent (time.monotonic)."""
        payload = job if isinstance(job, bytes) else encode(job, sender="skipfleet-probe")
        sent = time.monotonic()
        self.client.publish(self.topics.cmd_job(device_id), payload, qos=1).wait_for_publish(
            timeout
        )
        return sent

    def send(
        self,
        device_id: str,
        kind: TopicKind,
        message: Message,
        *,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> int:
        """Publish as the coordinator would on one of the device's topics (chunked if large);
        returns the number of publishes."""
        if not self.subscribed.wait(timeout):
            raise TimeoutError("the probe never connected")
        outgoing = encode_for_publish(message, sender="coordinator")
        for item in outgoing:
            topic = self.topics.topic(device_id, kind)
            self.client.publish(topic, item.payload, 1, retain).wait_for_publish(timeout)
        return len(outgoing)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
