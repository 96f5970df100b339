"""One load-generator process: N simulated devices on one asyncio loop.

    python -m skipfleet.loadgen --broker mqtt://127.0.0.1:1883 --base-model base.npz \\
        --data device.npz --devices 250 --first-index 0 --ready-file ready.json \\
        [--events installs.jsonl] [--device-seconds S] ...

At start it fine-tunes once for real (the reference every device's reports derive from), then
connects its devices in batches. When all are connected it writes `--ready-file` (JSON: pid,
device ids, the reference run's figures, the device seconds in use). Every change of a device's
running adapter is appended to `--events` as a JSON line {device, version, how, at (unix s)}:
what a benchmark reads to know when every device runs a version. SIGTERM or SIGINT: every device
publishes its retained `offline` and disconnects; exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import signal
import sys
import time
import uuid
from pathlib import Path

from shared.mqtt import parse_broker_url
from shared.topics import Topics
from skipfleet.loadgen.connection import DeviceConnection, LoopDriver
from skipfleet.loadgen.device import DeviceSettings, HostTemperature, SimulatedDevice
from skipfleet.loadgen.reference import Evaluator, ReferenceRun, run_reference

log = logging.getLogger("skipfleet.loadgen")

CONNECT_BATCH = 50  # connections opened per loop turn: CONNACKs get handled in between
READY_TIMEOUT_S = 300.0


def device_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m skipfleet.loadgen", description=__doc__)
    add = parser.add_argument
    add("--broker", required=True, help="mqtt://host:port")
    add("--base-model", type=Path, required=True)
    add("--data", type=Path, required=True, help="device data file (agent format)")
    add("--devices", type=int, required=True)
    add("--first-index", type=int, default=0, help="device ids count from here")
    add("--id-prefix", default="sim")
    add("--ready-file", type=Path, required=True)
    add("--events", type=Path, help="append adapter installs here as JSON lines")
    add("--device-seconds", type=float, help="a fine-tune's duration (default: measured)")
    add("--epochs", type=int, default=30, help="of the reference fine-tune")
    add("--lr", type=float, default=0.02, help="of the reference fine-tune")
    add("--holdout-fraction", type=float, default=0.25)
    add("--seed", type=int, default=0)
    add("--heartbeat-seconds", type=float, default=30.0)
    add("--fetch-timeout-seconds", type=float, default=60.0)
    add("--desired-retry-seconds", type=float, default=30.0)
    add("--desired-max-fetches", type=int, default=5)
    add("--max-queued-jobs", type=int, default=4)
    add("--will-delay-seconds", type=int, default=5)
    add("--keepalive-seconds", type=int, default=30)
    add("--session-expiry-seconds", type=int, default=86_400)
    add("--reconnect-max-seconds", type=int, default=60)
    add("--cohort", default="default")
    add("--topic-root", default="fleet")
    add("--power-profile", default="rpi-zero-2w", choices=("rpi-zero-2w", "generic"))
    add("--log-level", default="WARNING", type=str.upper)
    return parser


class InstallLog:
    """JSON lines of adapter changes, flushed as they happen (the benchmark reads them live)."""

    def __init__(self, path: Path | None) -> None:
        self._file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 (closed)
        self._quoted: dict[str, str] = {}  # each device id and `how` as a JSON string

    def __call__(self, device: str, version: int | None, how: str) -> None:
        """{"device", "version", "how", "at"}; written as json.dumps writes it, but the JSON
        encoder cost 3% of a generator's CPU in a round (two installs a device)."""
        if self._file is not None:
            number = "null" if version is None else int(version)
            at = float(time.time()).__repr__()  # as json writes a float
            self._file.write(f'{{"device": {self._quote(device)}, "version": {number}, '
                             f'"how": {self._quote(how)}, "at": {at}}}\n')  # fmt: skip

    def _quote(self, text: str) -> str:
        quoted = self._quoted.get(text)
        if quoted is None:
            quoted = self._quoted[text] = json.dumps(text)
        return quoted

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    reference = run_reference(
        args.base_model, args.data, epochs=args.epochs, lr=args.lr,
        holdout_fraction=args.holdout_fraction, seed=args.seed,
    )  # fmt: skip
    seconds = reference.seconds if args.device_seconds is None else args.device_seconds
    log.info("reference fine-tune: %.3f s; simulated fine-tunes take %.3f s", reference.seconds,
             seconds)  # fmt: skip
    return asyncio.run(serve(args, reference, seconds))


async def serve(args: argparse.Namespace, reference: ReferenceRun, seconds: float) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    installs = InstallLog(args.events)
    driver = LoopDriver(loop)
    connections = make_connections(args, reference, seconds, loop, driver, installs)
    keep_alive = loop.create_task(driver.keep_alive())
    started = time.monotonic()
    for start in range(0, len(connections), CONNECT_BATCH):
        for connection in connections[start : start + CONNECT_BATCH]:
            connection.connect()
        await asyncio.sleep(0)
    waiting = [c.connected.wait() for c in connections]
    await asyncio.wait_for(asyncio.gather(*waiting), READY_TIMEOUT_S)
    # The devices, their clients and the reference live as long as the process: out of the
    # garbage collector's sight, its full collections do not walk them in every round
    gc.collect()
    gc.freeze()
    write_ready(args, reference, seconds, connections, time.monotonic() - started)
    await stop.wait()
    await asyncio.gather(*(c.close() for c in connections))
    await until_closed(connections, timeout_s=5.0)
    keep_alive.cancel()
    installs.close()
    return 0


async def until_closed(connections: list[DeviceConnection], timeout_s: float) -> None:
    """Until every DISCONNECT went out and the broker closed the socket (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while any(c.client.socket() is not None for c in connections):
        if time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


def make_connections(args, reference, seconds, loop, driver, installs) -> list[DeviceConnection]:
    mqtt = parse_broker_url(
        args.broker, keepalive_s=args.keepalive_seconds,
        session_expiry_s=args.session_expiry_seconds,
        reconnect_max_delay_s=args.reconnect_max_seconds,
    )  # fmt: skip
    settings = DeviceSettings(
        device_seconds=seconds, heartbeat_seconds=args.heartbeat_seconds,
        fetch_timeout_s=args.fetch_timeout_seconds,
        desired_retry_s=args.desired_retry_seconds,
        desired_max_fetches=args.desired_max_fetches, max_queued_jobs=args.max_queued_jobs,
        cohort=args.cohort, power_profile=args.power_profile,
    )  # fmt: skip
    evaluator = Evaluator(reference.learner)
    evaluator.make_variants(reference.arrays)
    topics = Topics(args.topic_root)
    temperature = HostTemperature(loop)  # one host: one read for all its devices' heartbeats

    def connection_for(index: int) -> DeviceConnection:
        # The device exists before its connection (the Will carries its presence), so it
        # publishes through the connection bound below, as the agent's outbox does.
        connection: DeviceConnection | None = None
        rng = random.Random(index)
        device = SimulatedDevice(
            device_id(args.id_prefix, index), index, reference, evaluator, settings, loop,
            lambda *publish: connection.publish(*publish),
            boot_id=uuid.uuid4().hex[:16],  # the agent's is per process: one device each
            topics=topics, on_install=installs, rng=rng, temperature=temperature,
        )  # fmt: skip
        connection = DeviceConnection(device, mqtt, driver, loop,
                                      will_delay_s=args.will_delay_seconds, rng=rng)  # fmt: skip
        return connection

    first = args.first_index
    return [connection_for(index) for index in range(first, first + args.devices)]


def write_ready(args, reference: ReferenceRun, seconds: float, connections, took: float) -> None:
    ready = {
        "pid": os.getpid(),
        "devices": [c.device.device_id for c in connections],
        "connected_seconds": took,
        "device_seconds": seconds,
        "reference": reference.summary(),
    }
    temporary = args.ready_file.with_suffix(".tmp")
    temporary.write_text(json.dumps(ready))
    os.replace(temporary, args.ready_file)


if __name__ == "__main__":
    sys.exit(main())
