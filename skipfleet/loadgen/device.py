"""One simulated device: its messages in and out, its jobs, adapters, heartbeats and presence.

No MQTT client and no thread in here: the device is given a `publish(topic, payload, qos,
retain)` function and timers, and is fed what arrives (`on_message`), all on one event loop, so
it is unit-tested without a broker. Everything it sends goes out as the agent's uplink sends it:
encoded by shared.protocol, stamped with the process's boot id and this device's seq, chunked
over the publish limit, size-checked.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.downlink import decode_command
from agent.reconcile import FetchPolicy
from agent.startup import agent_version
from agent.telemetry import read_temperature
from shared.mqtt import check_publish_size
from shared.protocol import (
    DEFAULT_CHUNK_LIMIT,
    DecodeError,
    Reassembler,
    encode_for_publish,
    kind_of,
)
from shared.protocol.enums import JobReason, PresenceState
from shared.protocol.envelope import Envelope
from shared.protocol.messages import (
    AdapterPublication,
    DesiredState,
    Heartbeat,
    Job,
    Message,
    Presence,
)
from shared.protocol.routing import topic_kind_for
from shared.topics import TopicKind, Topics
from skipfleet.loadgen.adapters import AdapterSlots
from skipfleet.loadgen.desired import DesiredReconciler
from skipfleet.loadgen.energy import SimulatedEnergy
from skipfleet.loadgen.handlers import HandlerSettings, SimHandlers
from skipfleet.loadgen.jobs import SimJobRunner
from skipfleet.loadgen.reference import Evaluator, ReferenceRun
from skipfleet.loadgen.timing import Every, Timers

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int, bool], None]  # topic, payload, qos, retain
OnInstall = Callable[[str, int | None, str], None]  # device, version, how


@dataclass(frozen=True)
class DeviceSettings:
    device_seconds: float  # how long a simulated fine-tune "takes"
    heartbeat_seconds: float = 30.0
    fetch_timeout_s: float = 60.0
    desired_retry_s: float = 30.0
    desired_max_fetches: int = 5
    max_queued_jobs: int = 4
    cohort: str = "default"
    power_profile: str = "rpi-zero-2w"
    chunk_limit: int = DEFAULT_CHUNK_LIMIT


class HostTemperature:
    """The host's SoC temperature for the heartbeats of every device a process simulates: read
    at most once every `every_s`. Each heartbeat read the file itself (a failed open where the
    host has no thermal zone): ~10 µs in a row, but a heartbeat comes alone, after its loop
    slept, and costs the generator several times that (docs/benchmarks.md)."""

    def __init__(self, timers: Timers, every_s: float = 5.0, root: Path = Path("/")) -> None:
        self._timers, self._every_s, self._root = timers, every_s, root
        self._read_at = float("-inf")
        self._celsius: float | None = None

    def __call__(self) -> float | None:
        now = self._timers.time()
        if now - self._read_at >= self._every_s:
            self._read_at, self._celsius = now, read_temperature(self._root)
        return self._celsius


class SimulatedDevice:
    def __init__(
        self,
        device_id: str,
        index: int,
        reference: ReferenceRun,
        evaluator: Evaluator,
        settings: DeviceSettings,
        timers: Timers,
        publish: Publish,
        *,
        boot_id: str,
        topics: Topics | None = None,
        on_install: OnInstall = lambda device, version, how: None,
        rng: random.Random | None = None,
        temperature: Callable[[], float | None] | None = None,
    ) -> None:
        """`temperature`: the host's, shared by the process's devices (a HostTemperature of
        its own if not given)."""
        self.device_id = device_id
        self.boot_id = boot_id
        self.settings = settings
        self.topics = topics or Topics()
        self._reference = reference
        self._timers = timers
        self._publish = publish
        self._seq = itertools.count()
        self._reassembler = Reassembler(max_in_flight=4)
        self.dropped = 0  # undecodable commands without a readable job id
        self.slots = AdapterSlots()
        self.energy = SimulatedEnergy(settings.power_profile, timers.time)
        self._started = timers.time()
        self._last_beat = (self._started, self.energy.read_joules())
        self._beats: Every | None = None
        self._rng = rng or random.Random()
        self._temperature = temperature or HostTemperature(timers)

        def installed(version: int | None, how: str) -> None:
            on_install(device_id, version, how)

        self.handlers = SimHandlers(
            device_index=index, reference=reference, evaluator=evaluator, slots=self.slots,
            energy=self.energy, timers=timers, send=self.send,
            on_install=installed,
            settings=HandlerSettings(settings.device_seconds, settings.fetch_timeout_s),
        )  # fmt: skip
        self.runner = SimJobRunner(
            self.handlers.table(), self.send, timers,
            base_model_hash=reference.base_model_hash, max_queued=settings.max_queued_jobs,
        )  # fmt: skip
        self.desired = DesiredReconciler(
            base_model_hash=reference.base_model_hash, slots=self.slots, evaluator=evaluator,
            timers=timers, send_fetch=self.send, between_jobs=self.runner.between_jobs,
            on_install=installed, take_offer=self.runner.take_offer,
            policy=FetchPolicy(settings.desired_retry_s, settings.desired_max_fetches),
            rng=self._rng,
        )  # fmt: skip

    # ---- uplink

    @property
    def status_topic(self) -> str:
        return self.topics.status(self.device_id)

    def subscriptions(self) -> list[tuple[str, int]]:
        return self.topics.device_subscriptions(self.device_id)

    def encode(self, message: Message) -> list[bytes]:
        """One publish or its chunks, each checked against the publish limit."""
        limit = self.settings.chunk_limit
        outgoing = encode_for_publish(
            message, sender=self.device_id, limit=limit, boot_id=self.boot_id, seq=next(self._seq)
        )
        for item in outgoing:
            check_publish_size(item.payload, limit)  # paho does not check: mosquitto would drop us
        return [item.payload for item in outgoing]

    def send(self, message: Message) -> None:
        kind = topic_kind_for(kind_of(message))
        topic = self.topics.topic(self.device_id, kind)
        for payload in self.encode(message):
            self._publish(topic, payload, kind.qos, kind.retained)

    def presence(self, state: PresenceState) -> bytes:
        """A retained presence payload (the Will is one, made once at connect time)."""
        message = Presence(
            state, self.boot_id, _AGENT_VERSION, self._reference.base_model_hash,
            self.settings.cohort, {**_HOST, "power_source": self.energy.label,
                                   "sent_at": time.time(), "simulated": True},
        )  # fmt: skip
        (payload,) = self.encode(message)
        return payload

    # ---- connection events (from the MQTT layer, on the loop)

    def on_connected(self) -> None:
        """After every CONNACK: retained `online`; heartbeats start with the first one."""
        self._publish(self.status_topic, self.presence(PresenceState.ONLINE), 1, True)
        if self._beats is None:
            self.send(self.heartbeat())
            interval = self.settings.heartbeat_seconds
            # A simulated fleet starts at once, a real one does not: the periodic beats start at
            # a random phase, or a thousand devices would beat in the same second every period.
            self._beats = Every(self._timers, interval, lambda: self.send(self.heartbeat()),
                                first_delay=self._rng.uniform(0, interval))  # fmt: skip

    def stop(self) -> None:
        if self._beats is not None:
            self._beats.cancel()

    def heartbeat(self) -> Heartbeat:
        now, joules = self._timers.time(), self.energy.read_joules()
        then, joules_then = self._last_beat
        self._last_beat = (now, joules)
        return Heartbeat(
            power_w=max(0.0, (joules - joules_then) / (now - then)) if now > then else 0.0,
            power_source=self.energy.label,
            energy_j_total=joules,
            cache_bytes=self.handlers.last_cache_bytes,
            spool_depth=0,  # no spool: paho holds what is in flight, in memory
            spool_dropped=0,
            uptime_s=now - self._started,
            temperature_c=self._temperature(),
            drift_score=self._reference.drift_score,
            adapter_version=self.slots.running_version,
            busy_job_id=self.runner.busy_job_id,
            drifted=False,
        )

    # ---- downlink

    def on_message(self, topic: str, payload: bytes) -> None:
        try:
            device_id, kind = self.topics.parse(topic)
            if device_id != self.device_id:
                raise DecodeError(f"command for {device_id} arrived at {self.device_id}")
            envelope = self._decode(kind, payload)
        except DecodeError as err:
            if err.job_id is not None:
                self.runner.reject(err.job_id, err.job_reason or JobReason.MALFORMED, str(err))
            else:
                self.dropped += 1
                log.warning("%s: dropping an undecodable command: %s", self.device_id, err)
            return
        if envelope is not None:
            self._dispatch(envelope)

    def _decode(self, kind: TopicKind, payload: bytes) -> Envelope | None:
        return decode_command(self.device_id, kind, payload, self._reassembler)

    def _dispatch(self, envelope: Envelope) -> None:
        message = envelope.message
        if isinstance(message, Job):
            self.runner.submit(message)
        elif isinstance(message, AdapterPublication):
            self.slots.put(message)
        elif isinstance(message, DesiredState):
            if message.adapter is not None:  # carried inline: nothing to fetch
                self.slots.put(message.adapter)
            self.desired.offer(message)


_AGENT_VERSION = f"loadgen-{agent_version()}"
_HOST = {
    "hostname": socket.gethostname()[:64],
    "arch": platform.machine(),
    "cpus": os.cpu_count() or 1,
}
