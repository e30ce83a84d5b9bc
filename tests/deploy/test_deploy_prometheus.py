"""Prometheus and Grafana files: promtool accepts the config and rules, the alert unit tests pass, the
Grafana provisioning is consistent and the dashboard has the panels operators need."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from deploy_testkit import DASHBOARD, GRAFANA_DIR, PROMETHEUS_DIR, dashboard_queries, parse_promql, rule_queries, tool

PROMTOOL = tool("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install -y prometheus; "
                             "scripts/ensure_system_tools.sh installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_config():
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


@needs_promtool
def test_promtool_check_rules():
    proc = promtool("check", "rules", "alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_promtool_alert_unit_tests_pass():
    """deploy/prometheus/alerts_test.yml: synthetic series -> the alerts fire (and stay quiet) as designed."""
    proc = promtool("test", "rules", "alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_and_documented():
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert alerts - tested == set(), "alerts without a firing unit test"
    readme = (PROMETHEUS_DIR.parent / "README.md").read_text()
    assert [a for a in alerts if a not in readme] == [], "deploy/README.md explains every alert"
    for g in groups:
        for r in g["rules"]:
            if "alert" in r:
                assert r["labels"]["severity"] in ("critical", "warning", "info")
                assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_all_rule_and_dashboard_queries_parse_as_promql():
    for _, query in rule_queries() + dashboard_queries():
        parse_promql(query)  # raises with the query when it does not parse


def test_grafana_datasource_and_dashboard_provisioning():
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text())
    [ds] = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", []) if "datasource" in t}
    assert uids == {ds["uid"]}, "every panel must use the provisioned datasource"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/diffprompt.yml").read_text())["providers"]
    assert providers[0]["type"] == "file" and providers[0]["options"]["path"]
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


@pytest.mark.parametrize("title_words, must_query", [
    (("request rate",), "diffprompt_request_duration_seconds_count"),
    (("latency", "p50", "p95", "p99"), "histogram_quantile(0.99"),
    (("stage",), "diffprompt_stage_duration_seconds_bucket"),
    (("batch size",), "diffprompt_batch_size"),
    (("queue depth",), "diffprompt_queue_depth"),
    (("errors by reason",), "by (reason)"),
])
def test_dashboard_has_the_panel(title_words, must_query):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if all(w.lower() in p["title"].lower() for w in title_words)]
    assert panels, f"no panel titled with {title_words}"
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    assert must_query in exprs, (title_words, exprs)
    for p in panels:
        assert p["type"] in ("timeseries", "stat", "table") and p["gridPos"]["w"] > 0
