"""The Grafana dashboard, rendered from the panel table below.

cluster_configs/observability/grafana-dashboard.json is this module's render (a unit test
fails when they differ: run `python -m mlplatform.observability render` after editing the
table). Every expression names only metrics of the catalogue (metrics.py) or Ray's own
system metrics listed in check.RAY_SYSTEM_METRICS; check.check_dashboard proves it, and the
live test evaluates every expression against a real Prometheus scraping a real cluster.

Why some expressions look the way they do:
- Cost gauges are set once, from the ledger, when a job or search ends, and go with their
  process: a cost panel takes each series' largest value over the dashboard's time range.
- Rates use Grafana's $__rate_interval (at least four scrape intervals), not a fixed window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TITLE = "mlplatform"
UID = "mlplatform"
RATE = "$__rate_interval"
RANGE = "$__range"
# What Grafana substitutes for its built-in variables, for evaluating expressions outside
# Grafana (the live test): values a short test run can fill.
VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | table (bar gauge)
    description: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def _quantile(q: float, metric: str, by: str) -> Query:
    return _q(f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket[{RATE}])))",
              f"p{int(q * 100)} {{{{{by.split(',')[0]}}}}}")


ROWS: tuple[Row, ...] = (
    Row("Serving", (
        Panel("Requests per second by status", (
            _q(f"sum by (app, code) (rate(ray_mlplatform_serve_requests_total[{RATE}]))", "{{app}} {{code}}"),),
            "reqps"),
        Panel("Request latency (ingress)", (
            _quantile(0.5, "ray_mlplatform_serve_request_latency_ms", "app"),
            _quantile(0.99, "ray_mlplatform_serve_request_latency_ms", "app")), "ms"),
        Panel("Rows per model call (dynamic batching)", (
            _q(f"sum by (app, deployment) (rate(ray_mlplatform_serve_rows_total[{RATE}])) / "
               f"sum by (app, deployment) (rate(ray_mlplatform_serve_batch_rows_count[{RATE}]))",
               "{{app}} {{deployment}}"),)),
        Panel("Refused requests by reason", (
            _q("sum by (app, reason) (ray_mlplatform_serve_invalid_requests_total)", "{{app}} {{reason}}"),),
            kind="stat", description="Requests refused by auth or the request contract since the node started."),
        Panel("Running replicas", (
            _q("sum by (app, deployment) (ray_mlplatform_serve_running_replicas)", "{{app}} {{deployment}}"),)),
        Panel("Requests in flight (ingress)", (
            _q("sum by (app) (ray_mlplatform_serve_ingress_in_flight)", "{{app}}"),)),
    )),
    Row("Training", (
        Panel("Samples per second", (
            _q(f"sum by (run) (rate(ray_mlplatform_train_samples_total[{RATE}]))", "{{run}}"),),
            description="All workers of a run together."),
        Panel("Step time", (
            _quantile(0.5, "ray_mlplatform_train_step_seconds", "run"),
            _quantile(0.95, "ray_mlplatform_train_step_seconds", "run")), "s"),
        Panel("Training loss", (_q("avg by (run) (ray_mlplatform_train_loss)", "{{run}}"),)),
        Panel("Progress", (_q("max by (run) (ray_mlplatform_train_progress_ratio)", "{{run}}"),), "percentunit"),
        Panel("Peak memory per worker", (
            _q("max by (run, rank) (ray_mlplatform_train_peak_memory_bytes)", "{{run}} rank {{rank}}"),), "bytes"),
    )),
    Row("Tuning", (
        Panel("Trials running", (_q("sum by (search) (ray_mlplatform_tune_trials_running)", "{{search}}"),)),
        Panel("Trials ended by status", (
            _q("sum by (search, status) (ray_mlplatform_tune_trials_ended_total)", "{{search}} {{status}}"),),
            kind="stat"),
        Panel("Best metric so far", (
            _q("max by (search, metric) (ray_mlplatform_tune_best_metric)", "{{search}} {{metric}}"),)),
        Panel("Spend vs budget", (
            _q("sum by (search, currency) (ray_mlplatform_tune_spend)", "spent {{search}} ({{currency}})"),
            _q("max by (search, currency) (ray_mlplatform_tune_budget)", "budget {{search}} ({{currency}})"))),
    )),
    Row("Cost", (
        Panel("Cost by job", (
            _q(f"sum by (job, currency) (max_over_time(ray_mlplatform_cost_total[{RANGE}]))",
               "{{job}} ({{currency}})"),),
            kind="table", description="From the ledger, as each job or search ended (largest value in the range)."),
        Panel("Cost by market and region", (
            _q(f"sum by (market, region, currency) (max_over_time(ray_mlplatform_cost_total[{RANGE}]))",
               "{{market}} {{region}} ({{currency}})"),), kind="table"),
        Panel("Lost to spot preemption", (
            _q(f"sum by (job, currency) (max_over_time(ray_mlplatform_cost_lost_total[{RANGE}]))",
               "{{job}} ({{currency}})"),), kind="table"),
    )),
    Row("Residency", (
        Panel("Placement decisions", (
            _q("sum by (kind, what, classification) (ray_mlplatform_residency_decisions_total)",
               "{{kind}} {{what}} {{classification}}"),), kind="stat",
            description="Placements allowed, denials (refused before running) and guard violations, since the head "
            "node started."),
        Panel("Denials", (
            _q('sum by (what) (ray_mlplatform_residency_decisions_total{kind="denial"})', "{{what}}"),), kind="stat"),
        Panel("Actors and tasks checked after a job", (
            _q("sum by (classification, outcome) (ray_mlplatform_residency_placements_checked_total)",
               "{{classification}} {{outcome}}"),), kind="stat"),
    )),
    Row("Cluster (Ray system metrics)", (
        Panel("CPU use by node", (_q("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}"),), "percent"),
        Panel("Memory used by node", (_q("sum by (instance) (ray_node_mem_used)", "{{instance}}"),), "bytes"),
    )),
)

_WIDTH, _HEIGHT = 8, 8  # three panels per grid row (Grafana's grid is 24 wide)


def render() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (import it, or provision it with a Prometheus data source)."""
    panels: list[dict[str, Any]] = []
    y, next_id = 0, 1
    for row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        for i, p in enumerate(row.panels):
            panels.append(_panel(p, next_id, {"h": _HEIGHT, "w": _WIDTH, "x": (i % 3) * _WIDTH,
                                              "y": y + (i // 3) * _HEIGHT}))
            next_id += 1
        y += -(-len(row.panels) // 3) * _HEIGHT
    return {
        "title": TITLE, "uid": UID, "tags": ["mlplatform", "ray"], "timezone": "browser", "editable": True,
        "schemaVersion": 39, "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "panels": panels,
    }


def _panel(p: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": panel_id, "type": "bargauge" if p.kind == "table" else p.kind, "title": p.title, "gridPos": grid,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "expr": q.expr, "legendFormat": q.legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, q in enumerate(p.queries)],
    }
    if p.description:
        out["description"] = p.description
    if p.kind in ("stat", "table"):  # the latest value of each series, not a line over time
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return out


def dumps() -> str:
    """The render as the shipped file's text."""
    return json.dumps(render(), indent=2) + "\n"


def write(path: str | Path) -> Path:
    """Write the render to `path` (the shipped file: cluster_configs/observability/grafana-dashboard.json)."""
    path = Path(path)
    path.write_text(dumps())
    return path
