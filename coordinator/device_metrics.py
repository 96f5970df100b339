"""The per-device Prometheus series, made from the fleet's latest snapshot when scraped.

A prometheus_client Gauge child per device and series (15 series a device) cost ~9 KB of the
driver's memory a device (89 MiB at 10,000 devices) and 2.3 s of CPU to apply each snapshot.
Instead the snapshot's own records (one frozen DeviceGauges a device) are kept, and a scrape
turns them into samples. The series are those the Gauges made: a reading the device has not
given is no series (neither NaN nor 0: avg() over the fleet must stay a number), a device gone
from the snapshot has none, and what a device runs is one `device_adapter_info` series.

/metrics writes these series as text itself (DeviceCollector.exposition, the same lines
prometheus_client writes): through prometheus_client's metric families and its exposition,
10,000 devices' 140,000 samples cost the driver 0.8-1.1 s of CPU in the text format (a quarter
of it making the families, the rest writing each sample's line), a whole scrape as Prometheus
asks for it 1.2-2.0 s, now 0.2-0.3 s (`python -m skipfleet.bench_scrape`).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from coordinator.observations import DeviceGauges

PREFIX = "skipfleet_"
ACCURACY_STAGES = ("running", "before", "after")  # what it runs now; its last fine-tune's
LABEL_FREE_SIGNALS = ("confidence", "feature")

Reading = Callable[[DeviceGauges], float | None]
# prometheus_client's own formatting of a sample's value (Go's: 1e+06, +Inf, NaN), untyped there
go_float = cast(Callable[[float], str], floatToGoString)


@dataclass(frozen=True)
class DeviceSeries:
    """One per-device gauge: its name, help, labels beyond `device`, and each label value's
    reading of a device (no extra label: one reading)."""

    name: str
    help: str
    label: str | None
    readings: tuple[tuple[str, Reading], ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return ("device",) if self.label is None else ("device", self.label)


def _one(name: str, help: str, reading: Reading) -> DeviceSeries:
    return DeviceSeries(PREFIX + name, help, None, (("", reading),))


SERIES = (
    _one("device_online", "1 if the device is online, 0 if not", lambda d: 1 if d.online else 0),
    _one(
        "device_last_seen_timestamp_seconds",
        "When the coordinator last heard from the device (heartbeat or presence)",
        lambda d: d.last_seen,
    ),
    DeviceSeries(
        PREFIX + "device_accuracy_ratio",
        "Hold-out accuracy: of what the device runs now (stage running, from evaluations, "
        "applies and fine-tunes), and before and after its last fine-tune; absent unmeasured",
        "stage",
        (
            ("running", lambda d: d.accuracy),
            ("before", lambda d: d.accuracy_before),
            ("after", lambda d: d.accuracy_after),
        ),
    ),
    _one(
        "device_spooled_messages",
        "Messages the device's spool holds, waiting for the broker's acknowledgement",
        lambda d: d.spooled,
    ),
    _one("device_power_watts", "Last reported power draw", lambda d: d.power_w),
    _one("device_temperature_celsius", "Last SoC temperature", lambda d: d.temperature_c),
    _one("device_drift_score", "Last reported input drift score", lambda d: d.drift_score),
    _one(
        "device_clock_offset_seconds",
        "The device's clock minus the coordinator's, as the device estimates it",
        lambda d: d.clock_offset_s,
    ),
    _one(
        "device_adapter_version",
        "Fleet adapter version the device runs",
        lambda d: d.adapter_version,
    ),
    DeviceSeries(
        PREFIX + "device_label_free_score",
        "Calibrated label-free drift score (1 = the base model's threshold)",
        "signal",
        (("confidence", lambda d: d.confidence_score), ("feature", lambda d: d.feature_score)),
    ),
)
ADAPTER_INFO = PREFIX + "device_adapter_info"
ADAPTER_INFO_HELP = (
    "1 for what the device runs (origin: base, personal or fleet), its cohort and cluster"
)
ADAPTER_INFO_LABELS = ("device", "cohort", "origin", "cluster")


class DeviceCollector(Collector):
    """The per-device series of the latest snapshot; update() swaps it (one reference: a scrape
    on the HTTP thread reads one snapshot whole)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._devices: Sequence[DeviceGauges] = ()
        registry.register(self)

    def update(self, devices: Sequence[DeviceGauges]) -> None:
        self._devices = devices

    def described(self) -> dict[str, tuple[str, ...]]:
        """name -> label names of every series this collector makes."""
        return {s.name: s.labels for s in SERIES} | {ADAPTER_INFO: ADAPTER_INFO_LABELS}

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The names, for the registry's duplicate check (no samples)."""
        for name, labels in self.described().items():
            yield GaugeMetricFamily(name, "", labels=list(labels))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        devices = self._devices
        for series in SERIES:
            family = GaugeMetricFamily(series.name, series.help, labels=list(series.labels))
            for d in devices:
                for value, reading in series.readings:
                    reading_now = reading(d)
                    if reading_now is not None:
                        labels = [d.device_id] if series.label is None else [d.device_id, value]
                        family.add_metric(labels, float(reading_now))
            yield family
        info = GaugeMetricFamily(ADAPTER_INFO, ADAPTER_INFO_HELP, labels=list(ADAPTER_INFO_LABELS))
        for d in devices:
            info.add_metric([d.device_id, d.cohort, d.adapter_origin, d.cluster], 1.0)
        yield info

    def exposition(self, names: Container[str] | None = None, *, openmetrics: bool = False) -> str:
        """The series collect() makes, as prometheus_client writes them in Prometheus's text
        format or in OpenMetrics (a gauge's lines differ only in the escaping of its help),
        labels in its (sorted) order; only the families in `names`, if given. The names are
        as prometheus_client writes them under the escapings underscores and allow-utf-8."""
        devices, lines = self._devices, []
        for series in SERIES:
            if names is None or series.name in names:
                lines += _family_head(series.name, series.help, openmetrics)
                lines += _series_lines(series, devices)
        if names is None or ADAPTER_INFO in names:
            lines += _family_head(ADAPTER_INFO, ADAPTER_INFO_HELP, openmetrics)
            lines += (
                f'{ADAPTER_INFO}{{cluster="{_escaped(d.cluster)}",cohort="{_escaped(d.cohort)}",'
                f'device="{_escaped(d.device_id)}",origin="{_escaped(d.adapter_origin)}"}} 1.0\n'
                for d in devices
            )
        return "".join(lines)


def _family_head(name: str, help: str, openmetrics: bool) -> list[str]:
    doc = help.replace("\\", r"\\").replace("\n", r"\n")
    if openmetrics:
        doc = doc.replace('"', r"\"")
    return [f"# HELP {name} {doc}\n", f"# TYPE {name} gauge\n"]


def _series_lines(series: DeviceSeries, devices: Sequence[DeviceGauges]) -> Iterator[str]:
    # Each reading's label text, the same for every device
    labelled = [
        ("" if series.label is None else f',{series.label}="{value}"', reading)
        for value, reading in series.readings
    ]
    for d in devices:
        device = f'{series.name}{{device="{_escaped(d.device_id)}"'
        for label, reading in labelled:
            reading_now = reading(d)
            if reading_now is not None:
                yield f"{device}{label}}} {go_float(reading_now)}\n"


def _escaped(value: str) -> str:
    """A label value as both formats write it: backslash, newline and double quote escaped."""
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value
