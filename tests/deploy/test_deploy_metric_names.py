"""Every metric the dashboards, alert rules, prometheus-adapter rules and HPA use is one the real service
exports, with labels and label values it really has. The exposition comes from a live server (the tiny
artifact) after one good and one bad /v1/ground; a real Prometheus then evaluates every rule against it."""

from __future__ import annotations

import shutil

import httpx
import pytest
import yaml
from deploy_testkit import (
    K8S,
    PROMETHEUS_DIR,
    Selector,
    adapter_metric_names,
    adapter_queries,
    dashboard_queries,
    error_codes,
    histogram_quantile_problems,
    k8s_objects,
    recorded_names,
    rule_queries,
    selectors,
)
from prometheus_client.parser import text_string_to_metric_families
from service_testkit import prometheus_scraping, sample_png, wait_until

# Series Prometheus itself adds to every scrape target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added"}
# Labels Prometheus / the Prometheus Operator attach to every scraped series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
            "gauge": ("",), "info": ("_info",), "summary": ("", "_count", "_sum", "_created"),
            "untyped": ("",), "unknown": ("",)}


class Exposition:
    """What /metrics says: series names (sample names plus the ones each family's type implies), their labels."""

    def __init__(self, text: str):
        self.names: set[str] = set()
        self.labels: dict[str, set[str]] = {}
        self.values: dict[str, set[str]] = {}  # label -> values seen
        self.families: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            series = {family.name + suffix for suffix in SUFFIXES[family.type]}
            self.names |= series
            for sample in family.samples:
                self.names.add(sample.name)
                for name in series | {sample.name}:
                    self.labels.setdefault(name, set()).update(sample.labels)
                for key, value in sample.labels.items():
                    self.values.setdefault(key, set()).add(value)
            for name in series:
                self.labels.setdefault(name, set())
        for name in self.names:
            if name.endswith("_bucket"):
                self.labels[name].add("le")


@pytest.fixture(scope="module")
def exposition(live_server) -> Exposition:
    assert live_server.ground(sample_png(), "the blue star").status_code == 200
    assert live_server.ground(b"not an image", "the blue star").status_code == 400  # an errors_total series
    response = live_server.client.get("/metrics")
    assert response.status_code == 200
    return Exposition(response.text)


def all_queries() -> list[tuple[str, str]]:
    return dashboard_queries() + rule_queries() + adapter_queries()


def selector_problems(where: str, sel: Selector, exp: Exposition, recorded: set[str]) -> list[str]:
    from diffprompt.service.metrics import STAGES

    if sel.name in recorded or sel.name in PROMETHEUS_SYNTHETIC:
        return []
    if sel.name not in exp.names:
        return [f"{where}: {sel.name} is not exported by the service"]
    problems = []
    known_labels = exp.labels[sel.name] | TARGET_LABELS
    allowed_values = {"stage": set(STAGES), "reason": error_codes(), "route": exp.values.get("route", set())}
    for label, op, value in sel.matchers:
        if label not in known_labels:
            problems.append(f"{where}: {sel.name} has no label {label!r} (it has {sorted(exp.labels[sel.name])})")
        if op in ("=", "!=") and label in allowed_values and value not in allowed_values[label]:
            problems.append(f"{where}: {label}={value!r} never occurs (known: {sorted(allowed_values[label])})")
        if label == "status" and op in ("=", "!="):
            assert value.isdigit() and len(value) == 3, f"{where}: status={value!r}"
    return problems


def test_every_metric_name_used_is_exported(exposition):
    recorded = recorded_names()
    problems = []
    for where, query in all_queries():
        for sel in selectors(query):
            problems += selector_problems(where, sel, exposition, recorded)
        problems += histogram_quantile_problems(query)
    assert problems == []


def test_the_check_catches_a_wrong_name(exposition):
    """The check above is not vacuous: typos, wrong suffixes, unknown labels and values are reported."""
    recorded = recorded_names()
    for bad in ('rate(diffprompt_request_duration_seconds_total[5m])',  # histogram: no _total
                'diffprompt_queue_depth_total', 'diffprompt_errors', 'diffprompt_model',
                'rate(diffprompt_errors_total{reason="queue_ful"}[5m])',
                'diffprompt_stage_duration_seconds_count{stage="sampling"}',
                'diffprompt_queue_depth{route="/v1/ground"}'):
        found = [p for s in selectors(bad) for p in selector_problems("probe", s, exposition, recorded)]
        assert found, f"{bad} was not reported"
    assert histogram_quantile_problems("histogram_quantile(0.9, sum(rate(diffprompt_batch_size_bucket[5m])))")


def test_alerts_use_only_recording_rules_that_exist():
    recorded = recorded_names()
    for where, query in rule_queries():
        for sel in selectors(query):
            if ":" in sel.name:
                assert sel.name in recorded, f"{where}: {sel.name} is not recorded"


def test_hpa_scales_on_adapter_metrics_the_service_exports(exposition):
    served = adapter_metric_names()
    [hpa] = [o for (kind, _), o in k8s_objects().items() if kind == "HorizontalPodAutoscaler"]
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert names, "the HPA must scale on a Pods metric"
    for name in names:
        assert name in served, f"HPA metric {name} is not served by prometheus-adapter ({sorted(served)})"
        series = served[name]
        assert series in exposition.names and exposition.families.get(series) == "gauge", series
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    for rule in rules:
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"]["resource"] == "namespace" and overrides["pod"]["resource"] == "pod"
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"]


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="the Prometheus server is not installed (Debian: apt-get install -y "
                                               "prometheus; scripts/ensure_system_tools.sh installs it)")
def test_a_real_prometheus_evaluates_every_rule_and_panel_against_the_service(live_server, tmp_path):
    """deploy/prometheus/alerts.yml loaded by a real Prometheus scraping the real service (job diffprompt, as
    in compose): every rule evaluates without error, the recording rules produce values, and every
    dashboard query is accepted by the Prometheus query API."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "diffprompt"]
    del job["dns_sd_configs"]  # Docker DNS does not exist here: the same job on a static target
    job["static_configs"] = [{"targets": [f"127.0.0.1:{live_server.port}"]}]
    config["scrape_configs"] = [job]
    config["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    def value(query: str) -> float | None:
        try:
            r = api.get("/api/v1/query", params={"query": query})
        except httpx.TransportError:
            return None
        result = r.json().get("data", {}).get("result", []) if r.status_code == 200 else []
        return float(result[0]["value"][1]) if result else None

    with prometheus_scraping(PROMETHEUS, tmp_path / "prometheus.yml", live_server, tmp_path) as api:
        wait_until(lambda: (value("diffprompt:batch_size:mean5m") or 0) >= 1, timeout=120,
                   what="the recording rules to have values")
        assert value("diffprompt:ground_requests:rate5m") > 0
        assert 0 < value("diffprompt:ground_latency_seconds:p95_5m") <= 10
        stages = api.get("/api/v1/query", params={"query": "diffprompt:stage_latency_seconds:p95_5m"}).json()
        assert {r["metric"]["stage"] for r in stages["data"]["result"]} >= {"sampler", "grounding"}
        assert value('absent(up{job="diffprompt"} == 1)') is None, "DiffPromptNoReplicaUp's expression is quiet"
        rules = api.get("/api/v1/rules").json()["data"]["groups"]
        unhealthy = [(r["name"], r.get("lastError")) for g in rules for r in g["rules"] if r["health"] != "ok"]
        assert unhealthy == []
        assert sum(len(g["rules"]) for g in rules) == len(rule_queries())
        for where, query in dashboard_queries():
            r = api.get("/api/v1/query", params={"query": query})
            assert r.status_code == 200 and r.json()["status"] == "success", (where, r.text)
