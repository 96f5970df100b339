"""Grafana dashboards and provisioning, checked statically (Grafana runs neither here nor in CI).

Every PromQL expression may read only the metrics documented in docs/architecture.md (histograms
through _bucket/_sum/_count) with their documented labels, and every panel must use the
datasource uid that dashboards/provisioning/datasources/prometheus.yaml provisions.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql_names import (
    IMPLICIT_LABELS,
    PromQLTokenError,
    documented_metrics,
    promql_metric_names,
    promql_names,
)

REPO = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = REPO / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
DATASOURCES = DASHBOARD_DIR / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DASHBOARD_DIR / "provisioning" / "dashboards" / "skipfleet.yaml"
METRICS = documented_metrics(REPO / "docs" / "architecture.md")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_]\w*)\)$")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def datasource_uid() -> str:
    (source,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return source["uid"]


def panels(dashboard: dict):
    """Every panel, including those inside (collapsed) rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict):
    """(where, PromQL) for every query target and every query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"{panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["definition"])
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            yield f"variable {variable['name']}", match["selector"]


def all_expressions():
    return [
        (f"{path.name}: {where}", expr)
        for path in DASHBOARD_FILES
        for where, expr in expressions(load(path))
    ]


# -- the tokenizer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        ("skipfleet_devices_online", {"skipfleet_devices_online"}, set()),
        (
            'sum by (outcome) (increase(skipfleet_rounds_total{outcome="failed"}[$__range]))',
            {"skipfleet_rounds_total"},
            {"outcome"},
        ),
        (
            "histogram_quantile(0.95, sum by (le, algorithm) "
            "(rate(skipfleet_aggregation_duration_seconds_bucket[5m:1m] offset 1h)))",
            {"skipfleet_aggregation_duration_seconds_bucket"},
            {"le", "algorithm"},
        ),
        (
            'a{stage="after", device=~"$device"} - ignoring(stage) group_left b'
            " > bool 1e-3 or vector(0) unless on (device) c",
            {"a", "b", "c"},
            {"stage", "device"},
        ),
        (
            'sum(x{job="a,b}", instance!~"x(y)"}) BY (job) / scalar(y)',
            {"x", "y"},
            {"job", "instance"},
        ),
        ("max(sum without(cohort) (rate(e_total[${__rate_interval}])))", {"e_total"}, {"cohort"}),
    ],
)
def test_tokenizer_finds_metrics_and_labels(expr, metrics, labels):
    names = promql_names(expr)
    assert names.metrics == metrics
    assert names.labels == labels


@pytest.mark.parametrize("expr", ["histogram_quantil(0.9, x)", 'x{__name__="y"}', "x ? y"])
def test_tokenizer_rejects_what_it_cannot_vouch_for(expr):
    with pytest.raises(PromQLTokenError):
        promql_names(expr)


def test_documented_table_is_read():
    assert len(METRICS) >= 20
    assert METRICS["skipfleet_device_accuracy_ratio"].labels == {"device", "stage"}
    assert METRICS["skipfleet_finetune_duration_seconds"].type == "histogram"
    assert METRICS["skipfleet_energy_joules_total"].type == "counter"


# -- provisioning --------------------------------------------------------------------------
def test_datasource_is_provisioned_with_a_fixed_uid():
    config = yaml.safe_load(DATASOURCES.read_text())
    (source,) = config["datasources"]
    assert source["uid"] == "skipfleet-prometheus"
    assert source["type"] == "prometheus"
    # The compose service and port of Prometheus; its scrape interval sizes $__rate_interval.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert source["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_dashboard_provider_reads_the_mounted_dashboards():
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    grafana = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"])
    assert mounts["./dashboards"] == provider["options"]["path"]
    assert (
        mounts["./dashboards/provisioning/datasources"] == "/etc/grafana/provisioning/datasources"
    )
    assert mounts["./dashboards/provisioning/dashboards"] == "/etc/grafana/provisioning/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (DASHBOARD_DIR / Path(home).name).is_file()


# -- dashboards ------------------------------------------------------------------------------
def test_the_four_dashboards_exist():
    assert {path.stem for path in DASHBOARD_FILES} == {
        "fleet-overview",
        "energy-power",
        "finetune-time",
        "traffic",
    }


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_dashboard_is_provisionable(path):
    dashboard = load(path)
    assert dashboard["id"] is None  # provisioning assigns ids; a fixed one collides
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert "skipfleet" in dashboard["tags"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"{panel['title']}: no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_uids_are_unique():
    uids = [load(path)["uid"] for path in DASHBOARD_FILES]
    assert len(uids) == len(set(uids))


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.stem)
def test_every_panel_and_query_uses_the_provisioned_datasource(path):
    uid = datasource_uid()
    dashboard = load(path)
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": uid}


@pytest.mark.parametrize(("where", "expr"), all_expressions(), ids=lambda v: str(v)[:60])
def test_expression_reads_only_documented_metrics_and_labels(where, expr):
    names = promql_names(expr)
    assert names.metrics, f"{where}: no metric in {expr!r}"
    exposed = {series: metric for metric in METRICS.values() for series in metric.exposed_names()}
    unknown = names.metrics - exposed.keys()
    assert not unknown, f"{where}: {sorted(unknown)} not in docs/architecture.md ({expr!r})"
    allowed_labels = IMPLICIT_LABELS.union(*(exposed[m].labels for m in names.metrics))
    assert names.labels <= allowed_labels, f"{where}: labels {sorted(names.labels)} in {expr!r}"


def test_variables_use_documented_labels():
    for path in DASHBOARD_FILES:
        for variable in load(path)["templating"]["list"]:
            match = LABEL_VALUES.match(variable["definition"])
            (metric,) = promql_metric_names(match["selector"])
            assert match["label"] in METRICS[metric].labels, (path.name, variable["name"])


def test_every_documented_metric_is_on_a_dashboard():
    used = set().union(*(promql_metric_names(expr) for _, expr in all_expressions()))
    missing = [m.name for m in METRICS.values() if not m.exposed_names() & used]
    assert not missing, f"documented but on no dashboard: {missing}"


def test_counters_and_histograms_are_read_as_rates():
    """A raw counter or bucket is meaningless on a graph: it must sit inside rate()/increase()."""
    counters = {m.name for m in METRICS.values() if m.type == "counter"}
    histogram_series = {
        s for m in METRICS.values() if m.type == "histogram" for s in m.exposed_names()
    }
    for where, expr in all_expressions():
        if where.split(": ", 1)[1].startswith("variable"):
            continue
        for name in promql_metric_names(expr) & (counters | histogram_series):
            for match in re.finditer(rf"\b{name}\b", expr):
                before = expr[: match.start()]
                assert re.search(r"\b(rate|increase|irate)\(\s*$", before), (where, name)


def test_expressions_parse_with_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
    # Grafana substitutes its variables before Prometheus sees the query; do the same.
    substitutions = {"$__rate_interval": "1m", "$__range": "1h", "$device": ".*"}
    rules = []
    for i, (_, expr) in enumerate(all_expressions()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"skipfleet:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
