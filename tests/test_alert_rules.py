"""The alert rules of deploy/prometheus/alerts.yml: valid to promtool, every rule covered by the
unit tests of tests/prometheus/alerts_test.yml (fires and stays quiet where it should), and on
metrics the coordinator exports (docs/architecture.md)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql_names import documented_metrics, promql_names

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# The alerts the fleet's operator asked for (issue 14), by what they watch.
REQUIRED = {"SkipfleetDeviceOffline", "SkipfleetDriftHigh", "SkipfleetRoundFailed",
            "SkipfleetRollback", "SkipfleetSpoolGrowing", "SkipfleetClockSkew"}  # fmt: skip


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: run `make system-deps`")
    return found


def rules() -> list[dict]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def test_promtool_accepts_the_rules_file():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alert_rules_pass_their_promtool_unit_tests():
    result = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_the_required_ones_exist():
    names = {rule["alert"] for rule in rules()}
    assert names >= REQUIRED, REQUIRED - names
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    assert fired == names, names ^ fired  # each fires in some case, and no case tests a ghost


def test_alerts_read_only_metrics_the_coordinator_exports():
    documented = documented_metrics(ARCHITECTURE)
    known = set(documented) | {"up"}  # up: Prometheus's own, per scrape target
    for rule in rules():
        used = promql_names(rule["expr"]).metrics
        assert used <= known, (rule["alert"], used - known)
