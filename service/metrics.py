"""Prometheus metrics on an explicit registry (one per app); service.api.middleware times the requests.

Names (all seconds are wall-clock):

| metric | type | labels |
|---|---|---|
| `diffprompt_request_duration_seconds` | histogram, 1 ms .. 10 s | route, method, status |
| `diffprompt_requests_in_flight` | gauge | |
| `diffprompt_stage_duration_seconds` | histogram | stage (decode, condition, sampler, prompt_builder, ...) |
| `diffprompt_batch_size` | histogram, 1 .. 1024 | |
| `diffprompt_queue_depth` | gauge: requests admitted, not yet running | |
| `diffprompt_errors_total` | counter | reason (the error `code`) |
| `diffprompt_model_info` | info | model_version, ddim_steps, provider, method |

`/metrics`, `/livez` and `/readyz` are left out of the request histogram and the in-flight gauge.
Model stages are observed once per batch (the runtime times the whole batch); decode and
postprocess once per request.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder

REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGES = ("decode", "condition", "sampler", "prompt_builder", "grounding", "postprocess")


class Metrics:
    """Every metric of the service, registered on `self.registry` (never the global default registry)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "diffprompt_request_duration_seconds", "HTTP request latency (s) by route template, method and status",
            ["route", "method", "status"], buckets=REQUEST_BUCKETS, registry=r)
        self.in_flight = Gauge("diffprompt_requests_in_flight", "HTTP requests being handled", registry=r)
        self.stage_duration = Histogram(
            "diffprompt_stage_duration_seconds", "Pipeline stage latency (s); model stages once per batch",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("diffprompt_batch_size", "Requests per runtime.ground call",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("diffprompt_queue_depth", "Requests admitted and waiting for a batch", registry=r)
        self.errors = Counter("diffprompt_errors", "Error responses by reason (the error code)", ["reason"],
                              registry=r)
        self.model_info = Info("diffprompt_model", "The served artifact", registry=r)
        for stage in STAGES:  # export every series from the start, so rate() has a first sample
            self.stage_duration.labels(stage=stage)

    def observe_stages(self, seconds: dict[str, float]) -> None:
        for stage, value in seconds.items():
            self.stage_duration.labels(stage=stage).observe(value)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) in the text format or OpenMetrics, as the scraper's Accept header asks."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
