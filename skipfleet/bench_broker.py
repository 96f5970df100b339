"""Measure messages per second through an MQTT broker with N real paho clients.

    python -m skipfleet.bench_broker --clients 100 --messages 200 --qos 1
    python -m skipfleet.bench_broker --port 1883 --pid PID   # a broker already running

By default the broker is a private mosquitto (skipfleet.brokers, as `skipfleet simulate` starts
it); `--port` and `--pid` measure any other (docs/benchmarks.md: mosquitto against amqtt, the
Python broker we did not adopt). The broker runs in its own process and the clients in this one,
driven by one thread through epoll (paho's external loop API), so the two share the machine's
cores but not a GIL. Each client subscribes to its
own topic and publishes `--messages` messages to its neighbour's. Two figures: messages
delivered to subscribers per second (first publish to last delivery; on two cores the paho
clients cost more CPU than the broker), and the broker process's own CPU time per message
(Linux /proc), which says what the broker alone could sustain on one core.
"""

from __future__ import annotations

import argparse
import os
import selectors
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from skipfleet.brokers import MosquittoBroker

# mosquitto's default per-client queue (1000) would drop what the benchmark queues up front
MOSQUITTO_CONFIG = ("max_queued_messages 1000000", "max_inflight_messages 0")


class ClientSwarm:
    def __init__(self, port: int, count: int, protocol: MQTTProtocolVersion) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.clients = [
            paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{i}", protocol=protocol)
            for i in range(count)
        ]
        self.connected = self.subscribed = self.received = 0
        for client in self.clients:
            client.max_queued_messages_set(0)  # unbounded: the test queues everything up front
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        self.connected += 1

    def _on_subscribe(self, client, userdata, mid, reasons, properties) -> None:
        self.subscribed += 1

    def _on_message(self, client, userdata, message) -> None:
        self.received += 1

    def connect(self) -> None:
        for client in self.clients:
            client.connect("127.0.0.1", self.port, keepalive=120)
            self.selector.register(client.socket(), selectors.EVENT_READ, client)
        self.run_until(lambda: self.connected == len(self.clients))

    def run_until(self, done, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("the benchmark did not finish in time")
            for key, _ in self.selector.select(timeout=0.01):
                key.data.loop_read(max_packets=1000)
            for client in self.clients:
                if client.want_write():
                    client.loop_write()

    def close(self) -> None:
        for client in self.clients:
            self.selector.unregister(client.socket())
            client.disconnect()


def start_mosquitto(workdir: Path) -> MosquittoBroker:
    broker = MosquittoBroker(workdir, extra_config=MOSQUITTO_CONFIG)
    broker.start()
    return broker


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    port: int, clients: int, messages: int, qos: int, protocol, payload: int, broker_pid: int
) -> tuple[float, float]:
    """(messages delivered per second, broker CPU seconds per message)."""
    swarm = ClientSwarm(port, clients, protocol)
    swarm.connect()
    for index, client in enumerate(swarm.clients):
        client.subscribe(f"bench/{index}", qos=qos)
    swarm.run_until(lambda: swarm.subscribed == clients)
    body = b"x" * payload
    expected = clients * messages
    cpu_before = cpu_seconds(broker_pid)
    started = time.perf_counter()
    for round_ in range(messages):
        for index, client in enumerate(swarm.clients):
            client.publish(f"bench/{(index + 1) % clients}", body, qos=qos)
        if round_ % 10 == 9:  # keep the sockets moving while queueing
            swarm.run_until(lambda: True)
    swarm.run_until(lambda: swarm.received >= expected)
    elapsed = time.perf_counter() - started
    cpu_used = cpu_seconds(broker_pid) - cpu_before
    swarm.close()
    return expected / elapsed, cpu_used / expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--messages", type=int, default=200, help="per client")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--payload", type=int, default=100, help="bytes per message")
    parser.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    parser.add_argument("--port", type=int, help="an already running broker on 127.0.0.1...")
    parser.add_argument("--pid", type=int, help="...and its process id, for its CPU time")
    args = parser.parse_args(argv)
    protocol = MQTTProtocolVersion.MQTTv5 if args.protocol == "5" else MQTTProtocolVersion.MQTTv311
    if bool(args.port) != bool(args.pid):
        parser.error("--port and --pid go together")
    with tempfile.TemporaryDirectory(prefix="skipfleet-bench-broker-") as workdir:
        broker = None if args.port else start_mosquitto(Path(workdir))
        port, pid = (args.port, args.pid) if broker is None else (broker.port, broker.pid)
        try:
            rate, cpu_per_message = measure(
                port, args.clients, args.messages, args.qos, protocol, args.payload, pid
            )
        finally:
            if broker is not None:
                broker.stop()
    name = f"broker pid {pid}" if broker is None else "mosquitto"
    print(
        f"{name}: {rate:,.0f} messages/s delivered; broker CPU {describe_cpu(cpu_per_message)}: "
        f"{args.clients} clients x {args.messages} messages, QoS {args.qos}, "
        f"MQTT {args.protocol}, {args.payload} B"
    )
    return 0


def describe_cpu(seconds_per_message: float) -> str:
    if seconds_per_message <= 0:  # /proc counts clock ticks (10 ms): too short a run
        return "below one clock tick in all (run more messages)"
    per_core = 1 / seconds_per_message
    return f"{seconds_per_message * 1e6:.1f} µs/message (= {per_core:,.0f} messages/s per core)"


if __name__ == "__main__":
    sys.exit(main())
