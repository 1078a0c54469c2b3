"""The Prometheus alerting rules in deploy/alerts.yaml: valid, unit-tested with `promtool test rules`
(series that fire each rule and series that do not, in tests/deploy/alerts_test.yaml), and written
only against metrics the service really exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import Engine

import app.mailcow.client  # noqa: F401  (registers the mailcow call metrics)
from app.core.metrics import render
from app.gauges import database_gauges

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "deploy" / "alerts_test.yaml"


def _promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("TLSO_REQUIRE_PROMTOOL") == "1":
        pytest.fail("promtool is required (Debian package `prometheus`) but not installed")
    pytest.skip("promtool not installed (Debian package `prometheus`)")


def _promtool_run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_rules_are_valid() -> None:
    result = _promtool_run("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    result = _promtool_run("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict[str, str]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_every_rule_has_unit_tests_that_fire_it() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        check["alertname"] for case in tests for check in case.get("alert_rule_test", []) if check.get("exp_alerts")
    }
    quiet = {
        check["alertname"] for case in tests for check in case.get("alert_rule_test", []) if not check.get("exp_alerts")
    }
    names = {rule["alert"] for rule in _rules()}
    assert names - fired == set(), "rules never seen firing"
    assert names - quiet == set(), "rules never seen staying quiet"


@pytest.mark.parametrize("backend", ["sqlite"])
def test_the_rules_use_only_metrics_the_service_exports(engine: Engine) -> None:
    """A rule on a metric that does not exist never fires: compare with a real scrape."""
    scrape = render(engine, database_gauges).decode()
    exported = set(re.findall(r"^# TYPE (\S+) ", scrape, re.M))
    # Counters are declared without the `_total` suffix in `# TYPE` lines.
    exported |= {f"{name}_total" for name in exported}
    used = {name for rule in _rules() for name in re.findall(r"\btlso_[a-z_]+", rule["expr"])}
    assert used, "no tlso_ metric in the rules?"
    assert used - exported == set()
