"""Prometheus metrics: values move by the right amounts, and a real Prometheus scrapes and queries them."""

from __future__ import annotations

import shutil

import httpx
import pytest
from service_testkit import metric, prometheus_scraping, sample_png, wait_until

GROUND = {"route": "/v1/ground", "method": "POST"}


def test_metrics_move_by_the_right_amounts(server):
    before = server.metrics()
    for seed in range(3):
        assert server.ground(sample_png(), seed=seed, return_mask=True).status_code == 200
    for _ in range(2):
        assert server.ground(b"not an image").status_code == 400
    for path in ("/livez", "/readyz", "/metrics"):
        assert server.client.get(path).status_code == 200
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("diffprompt_request_duration_seconds_count", **GROUND, status="200") == 3
    assert delta("diffprompt_request_duration_seconds_count", **GROUND, status="400") == 2
    assert delta("diffprompt_request_duration_seconds_bucket", **GROUND, status="200", le="+Inf") == 3
    assert delta("diffprompt_request_duration_seconds_sum", **GROUND, status="200") > 0
    assert delta("diffprompt_errors_total", reason="not_an_image") == 2
    assert delta("diffprompt_stage_duration_seconds_count", stage="decode") == 5  # bad images are decoded too
    assert delta("diffprompt_stage_duration_seconds_count", stage="postprocess") == 3
    for stage in ("condition", "sampler", "prompt_builder", "grounding"):  # once per batch; sequential = 1 each
        assert delta("diffprompt_stage_duration_seconds_count", stage=stage) == 3
    assert delta("diffprompt_batch_size_count") == 3 and delta("diffprompt_batch_size_sum") == 3
    # probes and scrapes are not timed, nothing is left in flight or queued
    routes = {dict(labels).get("route") for (name, labels) in after if name.startswith("diffprompt_request_")}
    assert not routes & {"/livez", "/readyz", "/metrics"}
    assert metric(after, "diffprompt_requests_in_flight") == 0
    assert metric(after, "diffprompt_queue_depth") == 0


def test_every_route_is_labelled_by_its_template(server):
    """Static files, the docs' assets, /openapi.json and /favicon.ico under their routes; only 404s are "unmatched"."""
    before = server.metrics()
    requests = {"/static/samples/squares.png": ("/static/{path}", "200"),
                "/static/samples/nothing.png": ("/static/{path}", "404"),
                "/static-offline-docs/swagger-ui.css": ("/static-offline-docs/{path}", "200"),
                "/openapi.json": ("/openapi.json", "200"), "/docs": ("/docs", "200"),
                "/favicon.ico": ("/favicon.ico", "200"), "/": ("/", "200"), "/no/such/page": ("unmatched", "404")}
    for path, (_, status) in requests.items():
        assert server.client.get(path).status_code == int(status), path
    after = server.metrics()
    for path, (route, status) in requests.items():
        labels = {"route": route, "method": "GET", "status": status}
        assert metric(after, "diffprompt_request_duration_seconds_count", **labels) - \
            metric(before, "diffprompt_request_duration_seconds_count", **labels) == 1, (path, labels)


def test_request_histogram_buckets_span_1ms_to_10s(server):
    server.ground(sample_png())
    les = {dict(labels)["le"] for (name, labels) in server.metrics()
           if name == "diffprompt_request_duration_seconds_bucket"}
    assert {"0.001", "10.0", "+Inf"} <= les


def test_model_info_and_content_type(server):
    r = server.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    info = [dict(labels) for (name, labels) in server.metrics() if name == "diffprompt_model_info"]
    assert len(info) == 1
    assert info[0]["ddim_steps"] == "3" and info[0]["provider"] == "CPUExecutionProvider"
    assert info[0]["model_version"] == server.client.get("/readyz").json()["model"]["model_version"]
    om = server.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="the Prometheus server binary is not installed "
                                               "(Debian: apt-get install -y prometheus)")
def test_real_prometheus_scrapes_and_answers_a_quantile(server, tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: diffprompt\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.port}']\n")
    query = ("histogram_quantile(0.5, sum(rate(diffprompt_request_duration_seconds_bucket"
             '{route="/v1/ground"}[1m])) by (le))')
    answer: dict = {}

    def quantile_known() -> bool:
        try:
            r = api.get("/api/v1/query", params={"query": query})
        except httpx.TransportError:
            return False
        result = r.json().get("data", {}).get("result", []) if r.status_code == 200 else []
        if result and result[0]["value"][1] not in ("NaN", "+Inf", "-Inf"):
            answer["value"] = float(result[0]["value"][1])
            return True
        return False

    with prometheus_scraping(PROMETHEUS, config, server, tmp_path) as api:
        wait_until(quantile_known, timeout=90, what="Prometheus to answer the median latency")
        targets = api.get("/api/v1/targets").json()["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
        up = api.get("/api/v1/query", params={"query": 'up{job="diffprompt"}'}).json()["data"]["result"]
        assert up[0]["value"][1] == "1"
    assert 0 < answer["value"] <= 10.0
