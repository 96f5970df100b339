"""/metrics with the per-device series written apart (coordinator.device_metrics exposition,
coordinator.metrics_http): the same lines prometheus_client writes, in either format it
chooses, gzipped or not, restricted by name[], from one snapshot a scrape."""

from __future__ import annotations

import dataclasses
import gzip
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from coordinator.device_metrics import SERIES, DeviceCollector
from coordinator.metrics import FleetMetrics
from coordinator.observations import DeviceGauges, FleetSnapshot, MetricsReport

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def devices() -> tuple[DeviceGauges, ...]:
    """Every reading given, some missing, values Go writes with an exponent, label values
    that need escaping."""
    return (
        DeviceGauges("pi-1", True, 0.81, 0.9, 1.5, 44.0, 2.7, 3, "fleet", "c-0", 0.95, 1.2,
                     0.88, 1.7e9, 4, "fan", -0.012),
        DeviceGauges("pi-2", False),
        DeviceGauges('odd"id\\with\nall', True, adapter_version=12345678, power_w=1e-7,
                     cohort='co"hort', cluster="a\\b"),
    )  # fmt: skip


def only_devices(gauges: tuple[DeviceGauges, ...]) -> tuple[CollectorRegistry, DeviceCollector]:
    registry = CollectorRegistry()
    collector = DeviceCollector(registry)
    collector.update(gauges)
    return registry, collector


def test_the_device_lines_are_prometheus_clients_own_byte_for_byte():
    registry, collector = only_devices(devices())
    assert collector.exposition() == generate_latest(registry).decode()
    ours = collector.exposition(openmetrics=True) + "# EOF\n"
    assert ours == openmetrics.generate_latest(registry).decode()


def test_a_help_with_quotes_and_backslashes_is_escaped_as_each_format_escapes_it(monkeypatch):
    first = SERIES[0]
    odd = dataclasses.replace(first, help='a "quoted" \\ help\nover two lines')
    monkeypatch.setattr("coordinator.device_metrics.SERIES", (odd,))
    registry, collector = only_devices(devices())
    assert collector.exposition() == generate_latest(registry).decode()
    ours = collector.exposition(openmetrics=True) + "# EOF\n"
    assert ours == openmetrics.generate_latest(registry).decode()


def test_an_empty_fleet_still_writes_each_familys_help_and_type():
    registry, collector = only_devices(())
    assert collector.exposition() == generate_latest(registry).decode()


def test_names_restrict_the_device_lines_to_those_families():
    _, collector = only_devices(devices())
    text = collector.exposition({"skipfleet_device_online", "skipfleet_device_adapter_info"})
    names = {family.name for family in parse_text(text)}
    assert names == {"skipfleet_device_online", "skipfleet_device_adapter_info"}


class OneReport:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> MetricsReport:
        self.calls += 1
        return MetricsReport((), FleetSnapshot(devices=devices()))


@pytest.fixture
def served():
    metrics, source = FleetMetrics(), OneReport()
    metrics.refresh_on_scrape(source, max_age_s=0.0)  # every scrape makes a snapshot
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, source, f"http://127.0.0.1:{port}/metrics"
    metrics.stop_serving()


def scrape(url: str, **headers: str) -> tuple[str, dict[str, str]]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
        body, answered = response.read(), dict(response.headers)
    if answered.get("Content-Encoding") == "gzip":
        body = gzip.decompress(body)
    return body.decode(), answered


def samples(families) -> list[tuple]:
    """Every sample but the process's own (its CPU and memory move between two scrapes),
    sorted: a line written twice shows."""
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                  for family in families for s in family.samples
                  if not s.name.startswith("process_"))  # fmt: skip


@pytest.mark.parametrize("gzipped", [False, True])
def test_served_text_format_has_every_sample_prometheus_client_writes_from_one_snapshot(
    served, gzipped
):
    metrics, source, url = served
    text, headers = scrape(url, **({"Accept-Encoding": "gzip"} if gzipped else {}))
    assert source.calls == 1  # one snapshot for the device lines and the rest
    assert headers["Content-Type"].startswith("text/plain")
    assert (headers.get("Content-Encoding") == "gzip") is gzipped
    metrics.refresh_on_scrape(source, max_age_s=3600.0)  # the reference shows the same one
    reference = generate_latest(metrics.registry).decode()
    assert samples(parse_text(text)) == samples(parse_text(reference))
    assert 'skipfleet_device_online{device="pi-2"} 0.0' in text


def test_served_openmetrics_keeps_its_eof_last_and_parses_to_the_same_samples(served):
    metrics, source, url = served
    text, headers = scrape(url, Accept=OPENMETRICS)
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
    metrics.refresh_on_scrape(source, max_age_s=3600.0)
    reference = openmetrics.generate_latest(metrics.registry).decode()
    assert samples(parse_om(text)) == samples(parse_om(reference))


def test_name_restricts_the_served_families_devices_included(served):
    _, _, url = served
    text, _ = scrape(f"{url}?name[]=skipfleet_device_online&name[]=skipfleet_devices_known")
    names = {family.name for family in parse_text(text)}
    assert names == {"skipfleet_device_online", "skipfleet_devices_known"}


def test_a_method_other_than_get_is_refused_without_device_lines(served):
    _, _, url = served
    request = urllib.request.Request(url, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request)
    assert refused.value.code == 405
    assert b"skipfleet_device" not in refused.value.read()


def text_lines(text: str) -> list[str]:
    """The lines, sorted (families come in another order), less the process's own."""
    return sorted(line for line in text.splitlines() if "process_" not in line)


@pytest.mark.parametrize("kind", ["text/plain", "application/openmetrics-text"])
@pytest.mark.parametrize("escaping", ["underscores", "allow-utf-8", "values", "dots"])
def test_every_escaping_a_scraper_asks_for_gets_prometheus_clients_own_lines(
    served, kind, escaping
):
    metrics, source, url = served
    accept = f"{kind};version=1.0.0;escaping={escaping}"
    text, headers = scrape(url, Accept=accept, **{"Accept-Encoding": "gzip"})
    assert source.calls == 1
    encoder, content_type = choose_encoder(accept)
    assert headers["Content-Type"] == content_type
    metrics.refresh_on_scrape(source, max_age_s=3600.0)
    reference = encoder(metrics.registry).decode()
    assert text_lines(text) == text_lines(reference)
    if escaping == "dots":  # prometheus_client's escaping of our names
        assert "skipfleet__device__online" in text


def test_a_collector_registered_after_serving_is_served_and_one_removed_is_not(served):
    metrics, _, url = served
    late = Gauge("skipfleet_late_gauge", "registered after serve()", registry=metrics.registry)
    late.set(7)
    assert "skipfleet_late_gauge 7.0" in scrape(url)[0]
    metrics.registry.unregister(late)
    assert "skipfleet_late_gauge" not in scrape(url)[0]


@pytest.mark.parametrize("method,path", [("OPTIONS", "/metrics"), ("GET", "/favicon.ico")])
def test_a_request_that_is_no_scrape_makes_no_snapshot(served, method, path):
    _, source, url = served
    request = urllib.request.Request(url.replace("/metrics", path), method=method)
    with urllib.request.urlopen(request) as response:
        assert response.status == 200 and b"skipfleet" not in response.read()
    assert source.calls == 0
