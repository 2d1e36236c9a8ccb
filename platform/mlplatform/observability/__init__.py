"""Observability: the platform's metric catalogue, safe recording, the Grafana dashboard and its checker.

    from mlplatform.observability import check_dashboard, record
    record.inc("mlplatform_residency_decisions_total", 1, {"kind": "denial", "what": "train", "classification": ""})
    check_dashboard("cluster_configs/observability/grafana-dashboard.json")

Importing this package imports no Ray: serve replicas and Train workers import it on their
hot paths, and Ray is loaded only when a metric is first recorded.
"""

from __future__ import annotations

from mlplatform.observability import record
from mlplatform.observability.check import DashboardError, check_dashboard, metric_names
from mlplatform.observability.metrics import METRICS, Metric, exported_series

__all__ = ["METRICS", "DashboardError", "Metric", "check_dashboard", "exported_series", "metric_names", "record"]
