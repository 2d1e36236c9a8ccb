"""Every metric the platform exports: name, kind, tag keys and help, in one catalogue.

Instrumentation points create their Ray metrics from here (`instrument`) and the Grafana
dashboard is checked against it (mlplatform.observability.check), so a renamed metric or a
dashboard typo fails a unit test instead of drawing an empty panel.

Ray's metrics agent on each node exports a ray.util.metrics metric `x` to Prometheus as
`ray_x` (a histogram as `ray_x_bucket`, `ray_x_count`, `ray_x_sum`). How long a series
stays after its process exits (Ray 2.60's OpenTelemetry path, reporter_agent.py and
open_telemetry_metric_recorder.py): counters and histograms stay while the node's agent
runs; gauges go about two report intervals (~20 s) after their last report. So what must
outlive a short-lived process is a counter, or a gauge set by a long-lived one.

Tag values must come from small sets (a run, a job, a region, a classification, a status),
never from request data: each distinct value is a new Prometheus series.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

PREFIX = "ray_"  # what Ray's metrics agents put in front of every ray.util.metrics name

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

LATENCY_MS_BOUNDARIES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BATCH_BOUNDARIES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STEP_S_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class Metric:
    """One platform metric as ray.util.metrics creates it."""

    name: str
    kind: str
    help: str
    tags: tuple[str, ...]
    group: str
    boundaries: tuple[float, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The names Prometheus holds for it once Ray's agents export it."""
        base = PREFIX + self.name
        if self.kind == HISTOGRAM:
            return (f"{base}_bucket", f"{base}_count", f"{base}_sum")
        return (base,)


def _m(name: str, kind: str, help: str, tags: tuple[str, ...], group: str, boundaries: tuple = ()) -> Metric:
    return Metric(name, kind, help, tags, group, tuple(float(b) for b in boundaries))


SERVE_APP = ("app", "version")
TRAIN_TAGS = ("run", "rank")
TUNE_TAGS = ("search",)
COST_TAGS = ("job", "trial", "market", "region", "currency")
RESIDENCY_TAGS = ("kind", "what", "classification")

METRICS: tuple[Metric, ...] = (
    # ---- serving (mlplatform.serve; ingress and model replicas)
    _m("mlplatform_serve_requests_total", COUNTER, "HTTP requests by status code, model version and deployment.",
       ("app", "version", "code", "served_by"), "serving"),
    _m("mlplatform_serve_request_latency_ms", HISTOGRAM, "Ingress request latency in milliseconds.",
       SERVE_APP, "serving", LATENCY_MS_BOUNDARIES),
    _m("mlplatform_serve_batch_rows", HISTOGRAM, "Rows per model call after dynamic batching.",
       ("app", "deployment", "version"), "serving", BATCH_BOUNDARIES),
    _m("mlplatform_serve_rows_total", COUNTER,
       "Input rows run by a model deployment (exact, unlike the batch histogram's sum).",
       ("app", "deployment", "version"), "serving"),
    _m("mlplatform_serve_cache_requests_total", COUNTER,
       "Model calls answered from the response cache (`result=hit`) or run by the model (`result=miss`); "
       "only deployments with `cache.enabled`.",
       ("app", "deployment", "version", "result"), "serving"),
    _m("mlplatform_serve_cache_bytes", GAUGE, "Bytes held by a replica's response cache (bounded by `cache.max_bytes`).",
       ("app", "deployment", "version"), "serving"),
    _m("mlplatform_serve_fallback_total", COUNTER, "Requests served by the fallback deployment, by reason.",
       ("app", "version", "reason"), "serving"),
    _m("mlplatform_serve_invalid_requests_total", COUNTER,
       "Requests refused by auth or the request contract, by reason.", ("app", "reason"), "serving"),
    _m("mlplatform_serve_running_replicas", GAUGE,
       "Running replicas per model deployment, as the ingress last saw them.",
       ("app", "deployment"), "serving"),
    _m("mlplatform_serve_ingress_in_flight", GAUGE, "Requests inside one ingress replica (queue length seen by it).",
       ("app",), "serving"),
    _m("mlplatform_serve_drift_psi", GAUGE, "Population stability index of a live feature vs the training reference.",
       ("app", "version", "feature"), "serving"),
    _m("mlplatform_serve_drift_alert", GAUGE, "1 when any feature's PSI is over the alert threshold.",
       SERVE_APP, "serving"),
    _m("mlplatform_serve_canary_gate_state", GAUGE,
       "The canary gate's verdict: 1 on the current state's series (watching, rolled_back, promoted), 0 on the others.",
       ("app", "canary", "state"), "serving"),
    _m("mlplatform_serve_canary_gate_window", GAUGE,
       "The figures the canary gate judges over its window, by figure (requests, error_rate, p99_ms).",
       ("app", "canary", "figure"), "serving"),
    # ---- training (mlplatform.train.loop, every Ray Train worker; `run` is the spec's name)
    _m("mlplatform_train_loss", GAUGE, "Training loss (mean over the last window).", TRAIN_TAGS, "training"),
    _m("mlplatform_train_learning_rate", GAUGE, "Current learning rate.", TRAIN_TAGS, "training"),
    _m("mlplatform_train_samples_per_second", GAUGE, "Samples per second, all workers (last window).",
       TRAIN_TAGS, "training"),
    _m("mlplatform_train_tokens_per_second", GAUGE, "Tokens per second, all workers (LMs).", TRAIN_TAGS, "training"),
    _m("mlplatform_train_step", GAUGE, "Optimizer steps done.", TRAIN_TAGS, "training"),
    _m("mlplatform_train_progress_ratio", GAUGE, "Share of the run's steps done.", TRAIN_TAGS, "training"),
    _m("mlplatform_train_peak_memory_bytes", GAUGE, "Peak memory of this worker.", TRAIN_TAGS, "training"),
    _m("mlplatform_train_samples_total", COUNTER, "Samples this worker trained on (sum over ranks: the run's).",
       TRAIN_TAGS, "training"),
    _m("mlplatform_train_step_seconds", HISTOGRAM, "Wall time of one optimizer step on this worker.",
       TRAIN_TAGS, "training", STEP_S_BOUNDARIES),
    # ---- tuning (mlplatform.tune, the search's driver; `search` is the spec's name)
    _m("mlplatform_tune_trials_running", GAUGE, "Trials of the search running now.", TUNE_TAGS, "tuning"),
    _m("mlplatform_tune_trials_ended_total", COUNTER,
       "Trials that ended, by status: done (all steps), stopped (early: ASHA, budget, target), error.",
       ("search", "status"), "tuning"),
    _m("mlplatform_tune_best_metric", GAUGE, "Best value of the searched metric so far.", ("search", "metric"),
       "tuning"),
    _m("mlplatform_tune_spend", GAUGE, "What the search's trials reported spending so far.", ("search", "currency"),
       "tuning"),
    _m("mlplatform_tune_budget", GAUGE, "The search's money budget (absent: no limit).", ("search", "currency"),
       "tuning"),
    # ---- cost (mlplatform.cost.metrics; set from the ledger when a job or search ends)
    _m("mlplatform_cost_total", GAUGE, "Cost so far of a job's (or trial's) metered resources.", COST_TAGS, "cost"),
    _m("mlplatform_cost_lost_total", GAUGE, "Cost of work lost to spot preemption.", COST_TAGS, "cost"),
    # ---- residency (mlplatform.residency.writer: every audit record passes the cluster's one writer)
    _m("mlplatform_residency_decisions_total", COUNTER,
       "Residency decisions by kind: placement (allowed), denial (refused before running), violation "
       "(the runtime guard stopped a worker), by what asked (train, tune, export, register, policy, worker).",
       RESIDENCY_TAGS, "residency"),
    _m("mlplatform_residency_placements_checked_total", COUNTER,
       "Actors and tasks whose node a finished job's sweep checked, by outcome (inside, outside).",
       ("what", "classification", "outcome"), "residency"),
)

BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


def exported_series() -> dict[str, Metric]:
    """Every Prometheus series name the platform exports → its metric."""
    return {s: m for m in METRICS for s in m.series}


@lru_cache(maxsize=None)
def instrument(name: str) -> Any:
    """The process's one ray.util.metrics object for catalogue metric `name` (needs a connected worker).

    Raises:
        KeyError: `name` is not in the catalogue (add it to METRICS first).
    """
    from ray.util.metrics import Counter, Gauge, Histogram

    m = BY_NAME.get(name)
    if m is None:
        raise KeyError(f"Got {name!r} for a metric name; it is not in mlplatform.observability.metrics.METRICS: "
                       "add it there, so that the dashboard checker knows it")
    if m.kind == COUNTER:
        return Counter(m.name, m.help, tag_keys=m.tags)
    if m.kind == GAUGE:
        return Gauge(m.name, m.help, tag_keys=m.tags)
    return Histogram(m.name, m.help, boundaries=list(m.boundaries), tag_keys=m.tags)
