"""The operator kit under packaging/: Prometheus alert rules (checked and unit-tested by
promtool) and the Grafana dashboard, both naming only series the daemon exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cocoon_net.metrics import Metrics, PoolCounts

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
RULES = PACKAGING / "prometheus" / "cocoon-net.rules.yml"
RULE_TESTS = PACKAGING / "prometheus" / "cocoon-net.rules.test.yml"
DASHBOARD = PACKAGING / "grafana" / "cocoon-net.json"
# Series Prometheus makes itself, not the daemon.
SCRAPE_SERIES = {"up"}
SERIES = re.compile(r"\b((?:cocoon_net|process)_[a-z_]+)\b")


def promtool(*argv: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is not installed (scripts/system-deps installs prometheus)")
    return subprocess.run(
        ["promtool", *argv], capture_output=True, text=True, check=False, cwd=RULES.parent
    )


def exported_series() -> set[str]:
    """Every series name the daemon's /metrics serves (histograms with their suffixes)."""
    text = Metrics(lambda: PoolCounts(1, 1, 0, 0, 0)).render().decode()
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        names |= {name + s for s in suffixes}
        if kind == "counter" and not name.endswith("_total"):
            names.add(name + "_total")
    return names


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    fired = re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n\s+- exp_labels", RULE_TESTS.read_text())
    assert alerts == set(fired)


def test_rules_and_dashboard_name_only_series_the_daemon_exports() -> None:
    exported = exported_series()
    assert "cocoon_net_repairs_total" in exported
    rules = set(SERIES.findall(RULES.read_text()))
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    dashboard = set(SERIES.findall(exprs))
    assert rules - exported == set()
    assert dashboard - exported == set()
    # Each alert's subject is on the dashboard too, except the scrape's own `up`.
    assert rules - SCRAPE_SERIES <= dashboard
