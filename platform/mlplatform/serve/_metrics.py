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

from mlplatform.observability import metrics as catalogue

# The definitions (names, tag keys, buckets) live in the platform's one catalogue.
_SHORT = {
    "requests": "mlplatform_serve_requests_total",
    "latency": "mlplatform_serve_request_latency_ms",
    "batch_rows": "mlplatform_serve_batch_rows",
    "rows": "mlplatform_serve_rows_total",
    "fallback": "mlplatform_serve_fallback_total",
    "invalid": "mlplatform_serve_invalid_requests_total",
    "replicas": "mlplatform_serve_running_replicas",
    "in_flight": "mlplatform_serve_ingress_in_flight",
    "psi": "mlplatform_serve_drift_psi",
    "drift_alert": "mlplatform_serve_drift_alert",
    "canary_state": "mlplatform_serve_canary_gate_state",
    "canary_window": "mlplatform_serve_canary_gate_window",
}


@lru_cache(maxsize=1)
def metrics() -> dict[str, Any]:
    """Every serving metric by short name."""
    return {short: catalogue.instrument(name) for short, name in _SHORT.items()}
