"""The coordinator's CPU for a /metrics scrape as the fleet grows, in process: no Ray, no broker.

`python -m skipfleet.bench_scrape [--devices 1000,10000] [--repeat 5]` prints, for a snapshot of
N devices with every reading given (14 series a device):
- the per-device series through prometheus_client (its metric families, then its exposition
  of each sample): what /metrics did before the driver wrote them itself;
- the same lines written by coordinator.device_metrics (DeviceCollector.exposition);
- a whole scrape over HTTP (GET /metrics as Prometheus asks: OpenMetrics, gzip) from
  prometheus_client's own server of the whole registry (as before), and from FleetMetrics.serve;
  the snapshot already made (the actor's part is not in it).
Figures are this process's CPU time (time.process_time), the median of --repeat; and bytes.
"""

from __future__ import annotations

import argparse
import statistics
import urllib.request
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest, start_http_server

from coordinator.device_metrics import DeviceCollector
from coordinator.metrics import FleetMetrics
from coordinator.observations import DeviceGauges, FleetSnapshot, MetricsReport
from skipfleet.measure import cpu_seconds

# As Prometheus 2.x asks for its scrapes
ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def fleet(count: int) -> tuple[DeviceGauges, ...]:
    return tuple(
        DeviceGauges(f"dev-{i:05d}", True, 0.81, 0.9, 1.5 + i / 1e4, 44.0 + i % 17 / 10, 0.3,
                     3, "fleet", f"c-{i % 4}", 0.95, 1.2, 0.88, 1.7e9 + i, i % 5, "fan", 0.012)
        for i in range(count)
    )  # fmt: skip


def median_cpu(run: Callable[[], object], repeat: int) -> float:
    return statistics.median(cpu_seconds(run) for _ in range(repeat))


def measure(count: int, repeat: int) -> dict[str, float]:
    devices = fleet(count)
    registry = CollectorRegistry()
    DeviceCollector(registry).update(devices)
    metrics = FleetMetrics()
    metrics.refresh_on_scrape(lambda: MetricsReport((), FleetSnapshot(devices=devices)), 3600.0)
    before, _ = start_http_server(0, "127.0.0.1", registry=metrics.registry)
    port = metrics.serve("127.0.0.1", 0)
    try:
        scraped = scrape(port)  # the snapshot made once, as within max_age_s
        return {
            "prometheus_client_s": median_cpu(lambda: generate_latest(registry), repeat),
            "written_s": median_cpu(lambda: metrics.devices.exposition().encode(), repeat),
            "scrape_before_s": median_cpu(lambda: scrape(before.server_port), repeat),
            "scrape_s": median_cpu(lambda: scrape(port), repeat),
            "text_bytes": len(metrics.devices.exposition().encode()),
            "gzip_bytes": len(scraped),
        }
    finally:
        metrics.stop_serving()
        before.shutdown()
        before.server_close()


def scrape(port: int) -> bytes:
    headers = {"Accept": ACCEPT, "Accept-Encoding": "gzip"}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request) as response:
        return bytes(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1000,10000", help="fleet sizes, comma-separated")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each, the median printed")
    args = parser.parse_args(argv)
    print("devices  prometheus_client s  written s  scrape before s  scrape s  device text MB  "
          "gzipped MB")  # fmt: skip
    for count in (int(n) for n in args.devices.split(",")):
        m = measure(count, args.repeat)
        print(f"{count:7,d}  {m['prometheus_client_s']:19.3f}  {m['written_s']:9.3f}  "
              f"{m['scrape_before_s']:15.3f}  {m['scrape_s']:8.3f}  "
              f"{m['text_bytes'] / 1e6:14.2f}  {m['gzip_bytes'] / 1e6:10.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
