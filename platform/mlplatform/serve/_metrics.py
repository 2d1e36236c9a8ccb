"""Serving metrics through ray.util.metrics: they reach Ray's Prometheus endpoint and dashboard.

Created lazily, once per replica process (ray.util.metrics needs a connected worker).
Ray's metrics agents export them with a `ray_` prefix: in Prometheus, query
`ray_mlplatform_serve_requests_total` (tests/integration/test_serve_prometheus.py checks it).

Ray 2.60 rebuilds every histogram from its bucket counts using bucket midpoints, so a
histogram's `_count` and buckets are exact but its `_sum` is an approximation. Where the sum
matters (rows predicted) there is an exact counter beside the histogram:
mean batch size = rate(rows_total) / rate(batch_rows_count).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

LATENCY_MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


@lru_cache(maxsize=1)
def metrics() -> dict[str, Any]:
    """Every serving metric by short name."""
    from ray.util.metrics import Counter, Gauge, Histogram

    return {
        "requests": Counter(
            "mlplatform_serve_requests_total", "HTTP requests by status code, model version and deployment.",
            tag_keys=("app", "version", "code", "served_by"),
        ),
        "latency": Histogram(
            "mlplatform_serve_request_latency_ms", "Ingress request latency in milliseconds.",
            boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("app", "version"),
        ),
        "batch_rows": Histogram(
            "mlplatform_serve_batch_rows", "Rows per model call after dynamic batching.",
            boundaries=BATCH_BOUNDARIES, tag_keys=("app", "deployment", "version"),
        ),
        "rows": Counter(
            "mlplatform_serve_rows_total", "Input rows run by a model deployment (exact, unlike the batch histogram's sum).",
            tag_keys=("app", "deployment", "version"),
        ),
        "fallback": Counter(
            "mlplatform_serve_fallback_total", "Requests served by the fallback deployment, by reason.",
            tag_keys=("app", "version", "reason"),
        ),
        "invalid": Counter(
            "mlplatform_serve_invalid_requests_total", "Requests refused by auth or the request contract, by reason.",
            tag_keys=("app", "reason"),
        ),
        "replicas": Gauge(
            "mlplatform_serve_running_replicas", "Running replicas per model deployment, as the ingress last saw them.",
            tag_keys=("app", "deployment"),
        ),
        "in_flight": Gauge(
            "mlplatform_serve_ingress_in_flight", "Requests inside one ingress replica (queue length seen by it).",
            tag_keys=("app",),
        ),
        "psi": Gauge(
            "mlplatform_serve_drift_psi", "Population stability index of a live feature vs the training reference.",
            tag_keys=("app", "version", "feature"),
        ),
        "drift_alert": Gauge(
            "mlplatform_serve_drift_alert", "1 when any feature's PSI is over the alert threshold.",
            tag_keys=("app", "version"),
        ),
        "canary_state": Gauge(
            "mlplatform_serve_canary_gate_state",
            "The canary gate's verdict: 1 on the current state's series (watching, rolled_back, promoted), 0 on the others.",
            tag_keys=("app", "canary", "state"),
        ),
        "canary_window": Gauge(
            "mlplatform_serve_canary_gate_window", "The figures the canary gate judges over its window, by figure "
            "(requests, error_rate, p99_ms).", tag_keys=("app", "canary", "figure"),
        ),
    }
