"""A client that watches a fleet's topics and sends it jobs: for benchmarks, simulate and tests.

It subscribes to `{root}/#` with a persistent session, decodes (and reassembles) everything,
and lets the caller wait on a condition with a timeout instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from shared.mqtt import MqttSettings, connect_async, make_client
from shared.protocol import DecodeError, Reassembler, decode, encode
from shared.protocol.enums import JobState
from shared.protocol.envelope import Envelope
from shared.protocol.messages import Job, JobStatus
from shared.topics import Topics

Match = Callable[[str, Envelope, bool], bool]  # (topic, envelope, retained) -> wanted?


class FleetProbe:
    def __init__(self, settings: MqttSettings, client_id: str = "skipfleet-probe",
                 topics: Topics | None = None):  # fmt: skip
        self.topics = topics = topics or Topics()
        self.client = make_client(settings, client_id)
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.root}/#", qos=1)
        self.client.on_message = self._on_message
        self.received: list[tuple[str, Envelope, bool, float]] = []  # + arrival time
        self.bytes_from_device: dict[str, int] = {}  # what each device put on the wire
        self._changed = threading.Condition()
        self._reassembler = Reassembler()
        connect_async(self.client, settings)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        self._count_bytes(message.topic, len(message.payload))
        try:
            envelope = self._reassembler.feed(decode(message.payload))
        except DecodeError:
            return  # someone else's garbage is not the probe's problem
        if envelope is not None:
            with self._changed:
                arrival = time.monotonic()
                self.received.append((message.topic, envelope, bool(message.retain), arrival))
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
        out = []
        for topic, envelope, _, arrival in items:
            if isinstance(envelope.message, kind):
                out.append((self.topics.parse(topic)[0], envelope, arrival))
        return out

    def wait_for(self, match: Match, timeout: float) -> tuple[Envelope, float]:
        """The first message matching, and when it arrived (time.monotonic)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for topic, envelope, retained, arrival in self.received:
                    if match(topic, envelope, retained):
                        return envelope, arrival
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching message within {timeout} s")
                self._changed.wait(remaining)

    def job_status(self, job_id: str, state: JobState, timeout: float) -> tuple[JobStatus, float]:
        envelope, arrival = self.wait_for(
            lambda t, e, r: (
                isinstance(e.message, JobStatus)
                and e.message.job_id == job_id
                and e.message.state is state
            ),
            timeout,
        )
        return envelope.message, arrival

    def send_job(self, device_id: str, job: Job, timeout: float = 10.0) -> float:
        """Publish a job (QoS 1, wait for PUBACK); returns when it was sent (time.monotonic)."""
        sent = time.monotonic()
        info = self.client.publish(
            self.topics.cmd_job(device_id), encode(job, sender="skipfleet-probe"), qos=1
        )
        info.wait_for_publish(timeout)
        return sent

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
