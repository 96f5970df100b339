"""`skipfleet bench delivery`: an agent's reports across a network outage, through a real broker.

The agent's own delivery stack (agent.uplink -> agent.spool -> agent.outbox -> agent.transport,
paho-mqtt 2.x) sends fine-tune reports at a steady rate to a private mosquitto through a TCP
proxy (skipfleet.fleet.proxy); the proxy cuts the link for `--outage-seconds` (blackhole: a dead
Wi-Fi link that only keepalive detects; refuse: the connection is reset) while the agent keeps
reporting, then restores it. A subscriber on the broker stands for the coordinator and passes
every copy through the coordinator's de-duplication (coordinator.seen, its SQLite table).

Printed: reports made, delivered (distinct), lost, copies delivered twice on the wire, applied
twice after de-duplication, hand-overs to paho and PUBLISH packets paho wrote (first sends and
its own DUP re-sends after the reconnect), and how long after the restore the last report made
before it arrived (the outage's backlog drained).
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agent.outbox import Outbox
from agent.spool import Spool
from agent.transport import Transport
from agent.uplink import Uplink, new_boot_id
from coordinator.seen import SeenMessages
from coordinator.state_db import StateDB
from shared.mqtt import Will, connect_async, make_client, parse_broker_url
from shared.protocol import decode
from shared.protocol.messages import Report, ReportMetrics
from shared.topics import Topics
from skipfleet.brokers import MosquittoBroker
from skipfleet.fleet.base import CutMode
from skipfleet.fleet.proxy import ProxyLoop

DEVICE = "bench-agent"
TOPICS = Topics("bench-delivery")
DRAIN_TIMEOUT_S = 300.0


@dataclass
class DeliveryResult:
    cut: str
    outage_seconds: float
    reports_sent: int
    delivered: int
    lost: int
    duplicated_on_wire: int
    applied_twice: int
    handed_to_paho: int
    publish_packets_first: int
    publish_packets_dup: int
    backlog_seconds: float
    reports_made_during_outage: int


class PahoSends(logging.Handler):
    """Counts the PUBLISH packets paho writes on the report topic (first sends and DUP ones)."""

    def __init__(self, topic: str):
        super().__init__(logging.DEBUG)
        self.topic = topic
        self.first = self.dup = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if not text.startswith("Sending PUBLISH") or repr(self.topic) not in text:
            return
        if "(d1," in text:
            self.dup += 1
        else:
            self.first += 1


class Coordinator:
    """A subscriber standing for the coordinator: every copy through coordinator.seen."""

    def __init__(self, url: str, topic: str, state: Path):
        self.copies = 0
        self.applied: dict[str, int] = {}
        self.arrived: dict[str, float] = {}  # job id -> when its first copy arrived (monotonic)
        self._db = StateDB(state / "seen.sqlite")
        self._seen = SeenMessages(self._db, time.time)
        self._lock = threading.Lock()
        subscribed = threading.Event()
        settings = parse_broker_url(url)
        self.client = make_client(settings, "bench-coordinator")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = self._on_message
        connect_async(self.client, settings)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise TimeoutError("the coordinator's subscriber did not subscribe")

    def _on_message(self, client, userdata, message) -> None:
        envelope = decode(message.payload)
        with self._lock, self._db.transaction():
            self.copies += 1
            if self._seen.first_time(envelope):
                job_id = envelope.message.job_id
                self.applied[job_id] = self.applied.get(job_id, 0) + 1
                self.arrived.setdefault(job_id, time.monotonic())

    def snapshot(self) -> tuple[int, dict[str, int]]:
        with self._lock:
            return self.copies, dict(self.applied)

    def last_arrival(self, job_ids: list[str]) -> float | None:
        with self._lock:
            times = [self.arrived.get(job_id) for job_id in job_ids]
        return None if None in times else max(times, default=None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._db.close()


def report_id(index: int) -> str:
    return f"bench-{index}"


def make_report(index: int, rng: np.random.Generator) -> Report:
    metrics = ReportMetrics(
        accuracy_before=0.6, accuracy_after=0.9, samples=400, epochs=1, finetune_seconds=1.0,
        joules=1.0, power_source="model:generic", cache_hit_rate=0.0, base_model_hash="bench",
        method="skip2-delta", rank=4,
    )  # fmt: skip
    delta = rng.standard_normal((96, 3)).astype(np.float32)  # a Skip-LoRA delta's size
    return Report(report_id(index), {"delta3": delta}, metrics)


class Agent:
    """The agent's delivery stack, connected through the proxy."""

    def __init__(self, url: str, state: Path, keepalive_s: int):
        self.spool = Spool(state / "spool.sqlite", max_messages=100_000)
        self.handed = 0  # rows handed to paho (counted here, not by the outbox it measures)
        self.outbox = Outbox(self.spool, self._publish)
        self.uplink = Uplink(DEVICE, TOPICS, self.spool, boot_id=new_boot_id(),
                             on_spooled=self.outbox.notify)  # fmt: skip
        status = TOPICS.status(DEVICE)
        self.transport = Transport(
            parse_broker_url(url, keepalive_s=keepalive_s, reconnect_max_delay_s=10),
            client_id=DEVICE,
            subscriptions=TOPICS.device_subscriptions(DEVICE),
            status_topic=status,
            will=Will(status, b"offline"),
            online_payload=lambda: b"online",
            outbox=self.outbox,
            on_message=lambda *message: None,
            on_fatal=lambda err: None,
        )

    def _publish(self, item):
        mid = self.transport.publish_spooled(item)
        self.handed += mid is not None
        return mid

    def start(self) -> None:
        self.outbox.start()
        self.transport.start()
        if not self.transport.connected.wait(10):
            raise TimeoutError("the agent did not connect")

    def stop(self) -> None:
        self.transport.stop(b"offline")
        self.outbox.stop()
        self.spool.close()


def run(args) -> DeliveryResult:
    rng = np.random.default_rng(0)
    interval = 1.0 / args.rate
    topic = TOPICS.report(DEVICE)
    sends = PahoSends(topic)
    paho_log = logging.getLogger("paho")
    was = paho_log.level, paho_log.propagate
    paho_log.addHandler(sends)
    paho_log.setLevel(logging.DEBUG)
    paho_log.propagate = False  # counted, not printed
    with (
        tempfile.TemporaryDirectory(prefix="skipfleet-delivery-") as tmp,
        MosquittoBroker(Path(tmp) / "mosquitto") as broker,
    ):
        loop = ProxyLoop()
        proxy = loop.open("127.0.0.1", broker.port)
        coordinator = Coordinator(broker.url, topic, Path(tmp))
        agent = Agent(f"mqtt://127.0.0.1:{proxy.port}", Path(tmp), args.keepalive)
        agent.start()
        made = 0

        def report_for(seconds: float) -> int:
            nonlocal made
            start, count = time.monotonic(), 0
            while time.monotonic() - start < seconds:
                agent.uplink.send(make_report(made, rng))
                made, count = made + 1, count + 1
                time.sleep(interval)  # the reporting rate, not a wait for a condition
            return count

        try:
            report_for(args.before_seconds)
            print(f"cutting the agent's link ({args.cut}) for {args.outage_seconds:.0f} s")
            proxy.cut(CutMode(args.cut))
            during = report_for(args.outage_seconds)
            proxy.restore()
            restored, backlog = time.monotonic(), [report_id(i) for i in range(made)]
            report_for(args.after_seconds)
            _drain(agent, coordinator, made)
            last = coordinator.last_arrival(backlog)
        finally:
            agent.stop()
            coordinator.close()
            loop.close()
            paho_log.removeHandler(sends)
            paho_log.setLevel(was[0])  # setLevel: it also clears the loggers' level cache
            paho_log.propagate = was[1]
    copies, applied = coordinator.snapshot()
    delivered = len(applied)
    return DeliveryResult(
        cut=args.cut,
        outage_seconds=args.outage_seconds,
        reports_sent=made,
        delivered=delivered,
        lost=made - delivered,
        duplicated_on_wire=copies - delivered,
        applied_twice=sum(1 for n in applied.values() if n > 1),
        handed_to_paho=agent.handed,
        publish_packets_first=sends.first,
        publish_packets_dup=sends.dup,
        backlog_seconds=float("nan") if last is None else round(last - restored, 1),
        reports_made_during_outage=during,
    )


def _drain(agent: Agent, coordinator: Coordinator, made: int) -> None:
    """Until the spool is empty and every report arrived (or the drain timeout passed)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while agent.spool.stats().depth or len(coordinator.snapshot()[1]) < made:
        if time.monotonic() > deadline:
            return  # what did not arrive is counted as lost
        time.sleep(0.05)


def main(args) -> int:
    result = run(args)
    print(f"{'reports sent':<34}{result.reports_sent:>8}")
    print(f"{'  of them during the outage':<34}{result.reports_made_during_outage:>8}")
    print(f"{'delivered (distinct)':<34}{result.delivered:>8}")
    print(f"{'lost':<34}{result.lost:>8}")
    print(f"{'duplicated on the wire':<34}{result.duplicated_on_wire:>8}")
    print(f"{'applied twice (after de-dup)':<34}{result.applied_twice:>8}")
    print(f"{'handed to paho':<34}{result.handed_to_paho:>8}")
    print(f"{'PUBLISH packets: first / DUP':<34}"
          f"{result.publish_packets_first:>8} / {result.publish_packets_dup}")  # fmt: skip
    print(f"{'outage backlog in, after restore':<34}{result.backlog_seconds:>7.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0 if result.lost == 0 and result.applied_twice == 0 else 1
