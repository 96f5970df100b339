"""The dashboards against the coordinator that really runs, and a real Prometheus scraping it.

tests/test_dashboards_static.py holds every dashboard query to docs/architecture.md; these tests
hold them to what `skipfleet coordinator` exports. One fleet for the module: a private mosquitto,
the coordinator as a process on the session's Ray, three fan agents, and Prometheus scraping the
coordinator from before the round. After one real round (promoted on every device) and one
malformed message (for the rejection counter), every metric family has samples but those a
device here cannot have (MAY_BE_ABSENT). The operator's questions (which devices are offline, the
fleet's mean accuracy, devices behind per cohort, failed rounds, rejections) are asked of that
Prometheus with the dashboards' own queries; the last test stops a device.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from skipfleet.brokers import MosquittoBroker
from skipfleet.processes import AgentProcess
from skipfleet.scenario import Scenario, build_scenario
from tests.promql_names import documented_metrics, promql_names
from tests.test_dashboards_static import (
    DASHBOARD_DIR,
    DASHBOARD_FILES,
    LABEL_VALUES,
    expressions,
    load,
)
from tests.topology import (
    SCRAPE_SECONDS,
    Mqtt,
    devices_reachable,
    run_one_round,
    session_coordinator_flags,
    wait_until,
)

pytestmark = pytest.mark.slow

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
FAST_AGENT = (
    "--heartbeat-seconds", "1", "--will-delay-seconds", "0", "--reconnect-max-seconds", "2",
    "--power-profile", "generic",
)  # fmt: skip
# Series that are rightly absent (never NaN) here: no thermal zone on a CI runner (a Pi has
# one); no fleet version run when every device kept its own fine-tune (the version measured no
# better on its hold-out: the agent declines it). The tests check the second against the API.
TEMPERATURE = "skipfleet_device_temperature_celsius"
FLEET_VERSION_RUN = "skipfleet_device_adapter_version"
MAY_BE_ABSENT = frozenset({TEMPERATURE, FLEET_VERSION_RUN})
# Panels whose right answer in a healthy fleet is no rows: the list of offline devices.
EMPTY_WHEN_HEALTHY = frozenset({"'Offline devices (seconds since last seen)' A"})
SCRAPE_LABELS = frozenset({"job", "instance"})  # Prometheus adds these to every scraped series
# Series names prometheus_client derives from a family's name, by type (text format 0.0.4).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


# -- the fleet -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenario(data_dir, tmp_path_factory) -> Scenario:
    # A briefly pre-trained base model: fine-tuning clearly helps, so the canary promotes.
    return build_scenario("fan", 3, data_dir, tmp_path_factory.mktemp("scenario"), drift=False,
                          pretrain_epochs=5, log=lambda _: None)  # fmt: skip


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def coordinator_flags(ray_session, broker, tmp_path_factory) -> dict[str, str]:
    state_dir = tmp_path_factory.mktemp("coordinator") / "state"
    return {"broker": broker.url, **session_coordinator_flags(ray_session, state_dir)}


@pytest.fixture(scope="module")
def agents(scenario, broker, coordinator, tmp_path_factory) -> Iterator[list[AgentProcess]]:
    root = tmp_path_factory.mktemp("agents")
    agents = [
        AgentProcess(
            d.device_id,
            broker.url,
            d.data_file,
            scenario.base_model,
            root / d.device_id,
            root / f"{d.device_id}.log",
            FAST_AGENT,
        )
        for d in scenario.devices
    ]
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture(scope="module")
def fleet(agents, broker, coordinator) -> list[str]:
    """The device ids, once every metric family has samples."""
    ids = [agent.device_id for agent in agents]
    watch = [coordinator, *agents]
    wait_until("every device reachable", lambda: devices_reachable(coordinator, ids),
               watch=watch)  # fmt: skip
    run_one_round(coordinator, ids, watch=agents)
    # Nothing in a clean round is rejected: one undecodable message fills that counter.
    sender = Mqtt(broker.port, "observability-garbage", None, None)
    assert not sender.connect().is_failure
    assert not sender.publish(f"fleet/{ids[0]}/telemetry", b"not an envelope").is_failure
    sender.close()
    wait_until(
        "every metric family to have samples",
        lambda: not absent(coordinator.metrics()) - MAY_BE_ABSENT,
        watch=watch,
        details=lambda: f"no samples: {sorted(absent(coordinator.metrics()) - MAY_BE_ABSENT)}",
    )
    return ids


@pytest.fixture(scope="module")
def exposition(fleet, coordinator) -> str:
    """What GET /metrics answers, once every family has samples."""
    return coordinator.metrics()


# -- reading the exposition and the dashboards -----------------------------------------------------
def exported_series(text: str) -> dict[str, dict[str, set[str]]]:
    """Every series name Prometheus would store from `text` -> {label: values seen}."""
    series: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES[family.type]:
            series.setdefault(family.name + suffix, {})
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return series


def documented_label_values(architecture_md: Path) -> dict[str, dict[str, set[str]]]:
    """Label values the metric table lists (`outcome` = completed/failed), by metric."""
    section = architecture_md.read_text().split("## Prometheus metrics", 1)[1]
    values: dict[str, dict[str, set[str]]] = defaultdict(dict)
    for name, labels in re.findall(r"^\| `(\w+)` \|[^|]*\|([^|]*)\|", section, re.M):
        for label, listed in re.findall(r"`(\w+)` = ([\w/]+)", labels):
            values[name][label] = set(listed.split("/"))
    return values


def equality_matchers(expr: str) -> list[tuple[str, str]]:
    """(label, value) of the `label="value"` matchers whose value is no Grafana variable."""
    return [(k, v) for k, v in re.findall(r'(\w+)\s*=\s*"([^"]*)"', expr) if "$" not in v]


def selects_unseen_value(expr: str, series: dict[str, dict[str, set[str]]]) -> bool:
    """Whether `expr` selects a label value no exported series has yet (e.g. failed rounds)."""
    metrics = promql_names(expr).metrics
    seen = {
        label: set().union(*(series.get(m, {}).get(label, set()) for m in metrics))
        for label, _ in equality_matchers(expr)
    }
    return any(value not in seen[label] for label, value in equality_matchers(expr))


def absent(text: str) -> set[str]:
    """Families exported without a single sample."""
    return {f.name for f in text_string_to_metric_families(text) if not f.samples}


def panel_query(path: Path, title: str, ref: str = "A") -> str:
    """The PromQL of one dashboard panel's target, as Grafana sends it for the whole fleet."""
    (expr,) = [e for w, e in panel_queries(load(path)) if w == f"{title!r} {ref}"]
    grafana = {'device=~"$device"': 'device=~".*"', "$__range": "1h",
               "$__rate_interval": f"{4 * SCRAPE_SECONDS}s"}  # fmt: skip
    for variable, value in grafana.items():
        expr = expr.replace(variable, value)
    return expr


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of a dashboard's panel targets (its variables are label_values calls)."""
    return [(w, e) for w, e in expressions(dashboard) if not w.startswith("variable ")]


# -- the exposition --------------------------------------------------------------------------------
def test_the_coordinator_exports_exactly_the_documented_metrics(exposition, coordinator):
    families = {f.name: f for f in text_string_to_metric_families(exposition)}
    runs_fleet = any(d["running"]["origin"] == "fleet" for d in coordinator.get("/devices"))
    may_be_absent = {TEMPERATURE} | (set() if runs_fleet else {FLEET_VERSION_RUN})
    created = {name for name in families if name.endswith("_created")}  # prometheus_client's
    problems = []
    for metric in documented_metrics(ARCHITECTURE).values():
        name = metric.name.removesuffix("_total") if metric.type == "counter" else metric.name
        family = families.pop(name, None)
        if family is None:
            problems.append(f"{metric.name}: not exported")
            continue
        labels = {label for s in family.samples for label in s.labels} - {"le"}
        if not family.samples:  # no labels to compare
            labels = metric.labels
        if family.type != metric.type or labels != metric.labels:
            problems.append(f"{metric.name}: exported as {family.type} {sorted(labels)}, "
                            f"documented as {metric.type} {sorted(metric.labels)}")  # fmt: skip
        if not family.samples and name not in may_be_absent:
            problems.append(f"{metric.name}: no samples after a round")
    undocumented = set(families) - created
    assert not problems and not undocumented, (problems, sorted(undocumented))


def test_every_dashboard_query_reads_series_and_labels_the_coordinator_exports(exposition):
    series = exported_series(exposition)
    documented = {
        s: m for m in documented_metrics(ARCHITECTURE).values() for s in m.exposed_names()
    }
    documented_values = documented_label_values(ARCHITECTURE)
    problems = []
    for path in DASHBOARD_FILES:
        for where, expr in expressions(load(path)):
            where = f"{path.name} {where}"
            names = promql_names(expr)
            missing = sorted(names.metrics - series.keys())
            if missing:
                problems.append(f"{where}: {missing} not exported: {expr}")
                continue
            # A family with no sample here (MAY_BE_ABSENT) has the labels it is documented with.
            labels = SCRAPE_LABELS.union(
                *(series[m].keys() or documented[m].labels for m in names.metrics)
            )
            if names.labels - labels:
                problems.append(f"{where}: no label {sorted(names.labels - labels)}: {expr}")
            # A value no series has (live or listed in the docs) would select nothing, forever.
            for label, value in equality_matchers(expr):
                known = set().union(
                    *(series[m].get(label, set()) for m in names.metrics),
                    *(documented_values[m].get(label, set()) for m in names.metrics),
                )
                if value not in known:
                    problems.append(f"{where}: {label}={value!r} is never exported: {expr}")
    assert not problems, "\n".join(problems)


def test_no_exported_value_is_nan(exposition):
    # An unknown reading is no series: one NaN would turn a fleet-wide avg() into NaN.
    nan = [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if math.isnan(sample.value)
    ]
    assert not nan, nan


def test_promtool_accepts_the_scraped_metrics(exposition):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# -- Prometheus ------------------------------------------------------------------------------------
def test_prometheus_answers_the_devices_online_panel(prometheus, fleet):
    overview = load(DASHBOARD_DIR / "fleet-overview.json")
    (expr,) = [e for where, e in panel_queries(overview) if where.startswith("'Devices online' ")]
    (series,) = wait_until(
        f"Prometheus: {expr} = {len(fleet)}",
        lambda: [r for r in prometheus.query(expr) if float(r["value"][1]) == len(fleet)],
        watch=[prometheus],
    )
    assert series["metric"]["job"] == "skipfleet-coordinator"  # deploy/prometheus/prometheus.yml


def test_prometheus_answers_every_dashboard_query(prometheus, fleet, exposition):
    """Every panel query, with Grafana's variables filled as Grafana would, is valid PromQL to
    Prometheus and returns data, except those selecting an outcome this run did not have."""
    series = exported_series(exposition)
    queries = []
    for path in DASHBOARD_FILES:
        dashboard = load(path)
        grafana = {
            "$__rate_interval": f"{4 * SCRAPE_SECONDS}s",  # Grafana: at least 4 scrape intervals
            "$__range": dashboard["time"]["from"].removeprefix("now-"),
        }
        # A variable offers what its label_values query answers (the device picker: the fleet);
        # the panels are then looked at with its first value.
        for variable in dashboard["templating"]["list"]:
            selector, label = LABEL_VALUES.match(variable["definition"]).groups()
            values = prometheus.api(f"label/{label}/values", **{"match[]": selector})
            assert label != "device" or sorted(values) == sorted(fleet), values
            grafana[f"${variable['name']}"] = sorted(values)[0]
        for where, expr in panel_queries(dashboard):
            query = expr
            for variable, value in grafana.items():
                query = query.replace(variable, value)
            assert "$" not in query, (where, query)
            may_be_empty = (
                selects_unseen_value(expr, series)
                or where in EMPTY_WHEN_HEALTHY
                or bool(promql_names(expr).metrics & MAY_BE_ABSENT & absent(exposition))
            )
            queries.append((f"{path.name} {where}", query, may_be_empty))
    device = sorted(fleet)[0]

    unanswered: list[str] = []

    def all_answered() -> bool:
        unanswered.clear()
        for where, query, may_be_empty in queries:
            result = prometheus.query(query)  # fails on any error Prometheus reports
            if not result and not may_be_empty:
                unanswered.append(f"{where}: {query}")
            if 'device=~"' in query:  # $device narrowed it to that one device
                assert {r["metric"].get("device", device) for r in result} <= {device}, query
        return not unanswered

    wait_until(
        "every dashboard query to return data",
        all_answered,
        timeout=20,
        watch=[prometheus],
        details=lambda: "no data for:\n" + "\n".join(unanswered),
    )


# -- the operator's questions, answered by Prometheus with the dashboards' queries -------------
OVERVIEW = DASHBOARD_DIR / "fleet-overview.json"


def values(prometheus, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in prometheus.query(expr)}


@pytest.fixture(scope="module")
def scraped(prometheus, fleet) -> None:
    """Waits until Prometheus holds the fleet as the fleet fixture left it: its scrapes
    after the malformed message, and enough of them for the panels' increase() over a range (a
    test run alone asks right after the fixture, before the next scrape)."""

    def caught_up() -> bool:
        rejected = values(prometheus, "skipfleet_rejected_messages_total", "reason")
        failed = prometheus.query(panel_query(OVERVIEW, "Rounds failed"))
        return rejected.get("malformed", 0.0) >= 1 and bool(failed)

    wait_until("Prometheus: the fleet's scrapes", caught_up, watch=[prometheus])


def test_prometheus_names_each_device_online_and_when_it_was_last_seen(prometheus, fleet, scraped):
    online = values(prometheus, "skipfleet_device_online", "device")
    assert online == dict.fromkeys(fleet, 1.0)
    offline = panel_query(OVERVIEW, "Devices offline")
    assert values(prometheus, offline, "") == {"": 0.0}  # 0, not No data
    assert (
        prometheus.query(panel_query(OVERVIEW, "Offline devices (seconds since last seen)")) == []
    )
    ago = values(prometheus, panel_query(OVERVIEW, "Seconds since last seen, per device"), "device")
    assert set(ago) == set(fleet) and all(0 <= s < 10 for s in ago.values()), ago  # 1 s beats


def test_prometheus_fleet_mean_accuracy_is_the_mean_over_the_devices_measured(
    prometheus, coordinator, fleet
):
    measured = {d["device_id"]: d["accuracy"] for d in coordinator.get("/devices")}
    assert set(measured) == set(fleet) and None not in measured.values(), measured
    expected = sum(measured.values()) / len(measured)
    mean = panel_query(OVERVIEW, "Fleet mean accuracy")
    wait_until(
        f"Prometheus: {mean} = {expected}",
        lambda: [r for r in prometheus.query(mean) if abs(float(r["value"][1]) - expected) < 1e-9],
        watch=[prometheus],
    )
    by_cohort = panel_query(OVERVIEW, "Mean accuracy by cohort (what devices run)")
    ((cohort, value),) = values(prometheus, by_cohort, "cohort").items()
    assert cohort == coordinator.get("/devices")[0]["cohort"] and abs(value - expected) < 1e-9


def test_prometheus_counts_devices_behind_per_cohort(prometheus, coordinator, fleet):
    devices = coordinator.get("/devices")
    (cohort,) = {d["cohort"] for d in devices}
    (adapters,) = coordinator.get("/adapters")
    current = adapters["current_version"]
    assert current is not None, adapters  # the round's version was promoted
    # Behind: not running the cohort's current version, for whatever reason (here: a device
    # keeps its own fine-tune when the fleet's measures no better on its hold-out).
    running = [(d["running"]["origin"], d["running"]["version"]) for d in devices]
    behind = sum(1 for r in running if r != ("fleet", current))
    assert values(prometheus, "skipfleet_devices_behind", "cohort") == {cohort: behind}, running
    assert values(prometheus, "skipfleet_cohort_devices", "cohort") == {cohort: len(fleet)}
    total = panel_query(OVERVIEW, "Devices behind the newest version")
    assert values(prometheus, total, "") == {"": behind}
    share = panel_query(OVERVIEW, "Share of each cohort behind")
    assert values(prometheus, share, "cohort") == {cohort: behind / len(fleet)}


def test_prometheus_reads_zero_for_failed_rounds_rollbacks_and_job_failures(prometheus, scraped):
    for title in ("Rounds failed", "Rollouts rolled back"):
        assert [float(r["value"][1]) for r in prometheus.query(panel_query(OVERVIEW, title))] == [
            0.0
        ], title
    failures = values(prometheus, "skipfleet_job_failures_total", "reason")
    assert "timed_out" in failures and set(failures.values()) == {0.0}, failures
    rejected = values(prometheus, "skipfleet_rejected_messages_total", "reason")
    assert rejected["malformed"] >= 1 and rejected["unknown_job"] == 0, rejected


def test_prometheus_evaluates_every_alert_rule_on_the_live_series(prometheus, fleet):
    def evaluated() -> list[dict]:
        groups = prometheus.api("rules", type="alert")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = [r for r in rules if not r["lastEvaluation"].startswith("0001")]
        return rules if rules and len(done) == len(rules) else []

    rules = wait_until("every alert rule evaluated", evaluated, watch=[prometheus])
    assert {r["name"] for r in rules} >= {"SkipfleetDeviceOffline", "SkipfleetClockSkew"}
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r["lastError"]) for r in rules]


def test_zz_prometheus_lists_the_device_that_went_offline(prometheus, agents, fleet):
    """Stops a device: the module's last test (pytest runs them in file order)."""
    gone = agents[0]
    gone.stop()
    table = panel_query(OVERVIEW, "Offline devices (seconds since last seen)")
    (row,) = wait_until(
        f"Prometheus: {table} lists {gone.device_id}",
        lambda: prometheus.query(table),
        watch=[prometheus],
    )
    assert row["metric"]["device"] == gone.device_id and float(row["value"][1]) >= 0
    assert values(prometheus, panel_query(OVERVIEW, "Devices offline"), "") == {"": 1.0}
