"""The CPU of the same small piece of work done hot, and done after the thread slept.

`python -m skipfleet.bench_wake [--gaps 0,0.001,0.01,0.1] [--repeat 200]` makes and encodes a
device heartbeat (shared.protocol, as an agent or a simulated device sends one) again and again,
sleeping `gap` seconds before each, and prints the thread's CPU time (time.thread_time) for one,
the median over --repeat. On this shared 2-core machine the work costs many times more after a
sleep of a few milliseconds than in a row (its code and data are no longer in the core's caches
when the thread runs again). A message that arrives alone costs what the third or fourth row says,
one in a burst what the first says. (The temperature is read as the agent reads it: on a
machine without a thermal zone that is one failed open.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from agent.telemetry import read_temperature
from shared.protocol import encode_for_publish
from shared.protocol.messages import Heartbeat

BOOT_ID = "b" * 16
LIMIT = 256 * 1024


def heartbeat_made_and_encoded(seq: int) -> bytes:
    """What a device does for one heartbeat: read its readings, make it, encode it."""
    beat = Heartbeat(power_w=1.2, power_source="model:rpi-zero-2w", energy_j_total=3.0,
                     cache_bytes=0, spool_depth=0, spool_dropped=0, uptime_s=5.0,
                     temperature_c=read_temperature(Path("/")), drift_score=0.1,
                     adapter_version=3, busy_job_id=None, drifted=False)  # fmt: skip
    (publish,) = encode_for_publish(beat, sender="dev-00001", limit=LIMIT, boot_id=BOOT_ID,
                                    seq=seq)  # fmt: skip
    return publish.payload


def cpu_us_after(gap_s: float, repeat: int) -> float:
    """Median thread CPU (µs) of one heartbeat made and encoded after sleeping `gap_s`."""
    spent = []
    for seq in range(repeat):
        if gap_s > 0:
            time.sleep(gap_s)
        started = time.thread_time()
        heartbeat_made_and_encoded(seq)
        spent.append(time.thread_time() - started)
    return 1e6 * statistics.median(spent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gaps", default="0,0.001,0.01,0.1", help="seconds asleep before each, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=200, help="pieces of work a gap")
    args = parser.parse_args(argv)
    gaps = [float(g) for g in args.gaps.split(",")]
    if any(g < 0 for g in gaps) or args.repeat < 1:
        parser.error("gaps must be >= 0 and --repeat >= 1")
    cpu_us_after(0.0, 50)  # imports and first calls out of the way
    hot = None
    print(f"{'asleep s':>9} {'cpu µs':>8} {'x hot':>6}")
    for gap in gaps:
        us = cpu_us_after(gap, args.repeat)
        hot = hot if hot is not None else us
        print(f"{gap:9.3f} {us:8.1f} {us / hot:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
