"""Driver side of a search: plan, Tuner.fit over Ray Train trials, the ledger, the results.

Each trial is a Ray Tune function trial whose driver (a small actor on an on-demand node in
the allowed regions) runs one Ray Train v2 fit: Tune's placement group selector does not
reach Train's workers, so the trial sets their ScalingConfig selector itself, market
included. Every report carries the trial's spend so far (`cost`), which ASHA uses as its
clock and the budget guards add up. A spot node's notice ends the fit with an emergency
checkpoint; the trial picks its market again (spot while a spot node stays, else the
fallback) and resumes from that checkpoint, which Tune never sees as a failure.

Results go to <storage_path>/<name>/results/: trials.json, pareto.md, pareto.png, best.json.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform import residency
from mlplatform._internal import artifact_layout as layout
from mlplatform._internal import storage as _storage
from mlplatform.errors import PlatformError, PreflightError, ResidencyError, TrainingFailed
from mlplatform.tune import pareto
from mlplatform.tune._plan import TunePlan, plan
from mlplatform.tune.spec import COST_KEY, TuneSpec, load_train_spec, param_space, trial_train_spec

# How often the driver writes the ledger while the search runs: what a killed driver leaves.
METER_EVERY_S = 15.0
# Market choices a trial gets before it gives up (each one resumes from the last checkpoint).
MAX_HANDOVERS = 4


class TuneFailed(PlatformError):
    """The search ended without any trial reporting its metric."""


@dataclass(frozen=True)
class TuneResult:
    """A finished search: its trials, the Pareto front, the winner and where the files are."""

    name: str
    results_dir: str
    trials: list[dict[str, Any]] = field(hash=False)
    front: list[dict[str, Any]] = field(hash=False)
    best: dict[str, Any] | None = field(hash=False)
    best_why: str
    cost: dict[str, Any] = field(hash=False)
    registered: str | None = None

    def summary(self) -> str:
        lines = [f"{self.name}: {len(self.trials)} trials, spent {self.cost['cost']:.6f} {self.cost['currency']} "
                 f"(lost to preemption {self.cost['lost_cost']:.6f}); results in {self.results_dir}"]
        if self.best:
            lines.append(f"  best: trial {self.best['trial']} {self.best.get('metric_name')}="
                         f"{self.best.get('metric')} at {self.best[COST_KEY]:.6f} ({self.best_why})")
        if self.registered:
            lines.append(f"  registered: {self.registered}")
        return "\n".join(lines)


def tune(spec: TuneSpec, spec_path: str) -> TuneResult:
    """Plan, check and run the search on the connected cluster; meter it; write the results.

    Raises:
        SpecError, PlanError, PreflightError, ResidencyError, CostError: bad input, before any trial starts.
        TuneFailed: no trial reported the metric.
    """
    import ray

    base = load_train_spec(spec, spec_path)
    if not ray.is_initialized():
        from mlplatform.residency import guard

        env = {guard.CLASSIFICATION_ENV: base.classification} if base.classification else {}
        ray.init(runtime_env={"env_vars": env} if env else None)
    the_plan = plan(spec, base)
    print(the_plan.describe(), flush=True)
    the_plan.wait_for_start()
    _declare(spec, base, the_plan)
    with residency.confined(the_plan.policy, base.classification):
        return _run(spec, base, the_plan)


def _declare(spec: TuneSpec, base, the_plan: TunePlan) -> None:
    policy = the_plan.policy
    if policy is None:
        return
    from mlplatform.residency import guard

    classification = policy.resolve(base.classification)
    try:
        guard.check_driver(policy, classification)
    except ResidencyError as e:
        residency.record("denial", what="tune", name=spec.name, job_id=_job_id(), reason=str(e))
        raise
    guard.declare(classification)
    residency.record("placement", what="tune", name=spec.name, job_id=_job_id(), policy=policy.name,
                     classification=classification, selector=the_plan.selectors[the_plan.markets[0]])


def _run(spec: TuneSpec, base, the_plan: TunePlan) -> TuneResult:
    from ray import tune as ray_tune

    from mlplatform.tune import _search, budget
    from mlplatform.tune._metrics import SearchMetrics

    exp_dir = f"{_storage.absolute(spec.storage_path).rstrip('/')}/{spec.name}"
    results_dir = f"{exp_dir}/results"
    _storage.check_write(results_dir, "storage_path")
    searcher, stopper = budget.guards(spec, _search.build_searcher(spec), forecast=the_plan.trial_cost)
    # ASHA's last rung is a full trial's forecast spend (a trial that costs more still finishes).
    full = the_plan.trial_cost if spec.scheduler.time_attr == COST_KEY else the_plan.trial_steps
    scheduler = _search.build_scheduler(spec, full_trial=full)
    trial_fn = ray_tune.with_resources(
        ray_tune.with_parameters(_trial, context=_TrialContext.of(spec, base, the_plan, exp_dir)),
        ray_tune.PlacementGroupFactory(
            [the_plan.driver_resources], bundle_label_selector=[the_plan.driver_selector]
        ),
    )
    tuner = ray_tune.Tuner(
        trial_fn,
        param_space=param_space(spec),
        tune_config=ray_tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials,
        ),
        run_config=ray_tune.RunConfig(
            name=spec.name, storage_path=_storage.absolute(spec.storage_path), stop=stopper,
            failure_config=ray_tune.FailureConfig(max_failures=1), verbose=1,
            callbacks=[SearchMetrics(spec)],  # trials, best metric, spend vs budget → Prometheus
        ),
    )
    ledger_loop = _Metering(the_plan, spec.name)
    ledger_loop.start()
    try:
        grid = tuner.fit()
    finally:
        ledger_loop.stop()
    time.sleep(2)  # the last tasks' events reach the state API
    totals, by_trial = ledger_loop.final(exp_dir)
    return _results(spec, base, the_plan, grid, totals, by_trial, results_dir)


# ---------------------------------------------------------------- the trial


@dataclass(frozen=True)
class _TrialContext:
    """What every trial needs from the driver, as plain picklable data."""

    name: str
    metric: str
    base: dict[str, Any]
    exp_dir: str
    markets: tuple[str, ...]
    selectors: dict[str, dict[str, str]]
    catalog: dict[str, Any]

    @classmethod
    def of(cls, spec: TuneSpec, base, the_plan: TunePlan, exp_dir: str) -> _TrialContext:
        return cls(spec.name, spec.metric, base.model_dump(mode="json"), exp_dir, tuple(the_plan.markets),
                   {m: dict(s) for m, s in the_plan.selectors.items()}, the_plan.catalog.model_dump(mode="json"))


def _trial(config: dict[str, Any], context: _TrialContext) -> None:
    """One trial: a Ray Train run of the base TrainSpec with `config` applied, on the best market open."""
    from ray import tune as ray_tune

    from mlplatform.cost import meter
    from mlplatform.cost.catalog import PriceCatalog
    from mlplatform.train.spec import TrainSpec
    from mlplatform.tune._report import CostReport

    trial_id = ray_tune.get_context().get_trial_id()
    meter.claim(trial_id)
    base = TrainSpec.model_validate(context.base)
    spec = trial_train_spec(base, config, f"{context.name}-{trial_id}")
    spec = spec.model_copy(update={"storage_path": f"{context.exp_dir}/runs"})
    catalog = PriceCatalog.model_validate(context.catalog)
    spent = 0.0
    for attempt in range(MAX_HANDOVERS):
        market = _open_market(context)
        started = time.time()
        print(f"[mlplatform.tune] trial {trial_id}: attempt {attempt + 1} on {market} "
              f"({context.selectors[market]})", flush=True)
        report = CostReport(catalog, spec.resources_per_worker, spent, market, context.metric)
        try:
            _fit_trial(spec, context.selectors[market], report)
            return
        except TrainingFailed:
            if not _spot_went(context, started):
                raise
            spent = report.spent_until_now()
            print(f"[mlplatform.tune] trial {trial_id}: its spot node went; resuming from the last checkpoint",
                  flush=True)
    raise TrainingFailed(f"trial {trial_id}: preempted {MAX_HANDOVERS} times; giving up")


def _fit_trial(spec, selector: dict[str, str], report) -> None:
    from mlplatform.train import trainer
    from mlplatform.train.plan import plan as train_plan

    clock = trainer._Phases(spec.name)
    trainer._train(spec, train_plan(spec), residency.current(), selector, clock, callbacks=(report,),
                   max_preemption_failures=0, whole_job=False)


def _open_market(context: _TrialContext) -> str:
    """The first market in preference order with a live node not under a preemption notice."""
    import ray

    from mlplatform.cluster.inventory import from_ray_nodes

    draining = set(ray._private.state.state.get_draining_nodes())
    live = [n for n in from_ray_nodes(ray.nodes()) if n.alive and n.node_id not in draining]
    for market in context.markets:
        if any(n.matches(context.selectors[market]) for n in live):
            return market
    raise PreflightError(
        f"no live node matches any market the search may use ({', '.join(context.markets)}); "
        "the cluster lost them, or add `fallback: on-demand` under `market`"
    )


def _spot_went(context: _TrialContext, since: float) -> bool:
    """Whether a spot node the trial could use is under notice, or went, since `since` (unix s)."""
    import ray
    from ray.util.state import list_nodes

    from mlplatform.cluster.inventory import Node

    spot = context.selectors.get("spot")
    if spot is None:
        return False
    draining = set(ray._private.state.state.get_draining_nodes())
    for n in list_nodes(detail=True, raise_on_missing_output=False):
        node = Node(n.node_id, n.node_name, n.node_ip, n.labels or {}, n.resources_total or {}, n.state == "ALIVE",
                    n.is_head_node)
        if not node.matches(spot):
            continue
        if n.node_id in draining or (n.state == "DEAD" and (n.end_time_ms or 0) / 1000 >= since):
            return True
    return False


# ---------------------------------------------------------------- metering and results


class _Metering:
    """Writes this job's usage to the ledger every METER_EVERY_S, and once more at the end."""

    def __init__(self, the_plan: TunePlan, name: str):
        from mlplatform.cost import ledger

        self.plan, self.name = the_plan, name
        from mlplatform.cost.meter import ledger_job_id

        self.ledger = ledger.open_ledger()
        self.ray_job = _job_id()
        self.job_id = ledger_job_id(self.ray_job)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cost-meter", daemon=True)
        self.ledger.record_job(the_plan.cluster, self.job_id, "tune", name, started_at=self.started,
                               extra={"submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID")})

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(METER_EVERY_S):
            try:
                self.meter()
            except Exception as e:  # noqa: BLE001 - a failed pass is retried; the final pass must succeed
                print(f"[mlplatform.tune] cost metering pass failed ({e}); retrying", flush=True)

    def meter(self):
        from mlplatform.cost import meter

        usages = meter.meter_job(self.ray_job, self.plan.cluster, self.plan.catalog)
        self.ledger.record(usages)
        return usages

    def final(self, exp_dir: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        from mlplatform.cost import lost, meter, metrics

        usages = self.meter()
        logs = {t: f"{exp_dir}/runs/{self.name}-{t}/steps.log" for t in {u.trial for u in usages if u.trial}}
        losses = lost.from_step_logs(self.plan.cluster, self.job_id, logs, usages)
        self.ledger.record_lost(losses)
        spans = [max(u.ended_at or u.started_at for u in rows) - min(u.started_at for u in rows)
                 for rows in _by_trial(usages).values()]
        # The longest trial is the nearest to a full one: the next plan's forecast (tune/plan.py).
        extra = {"submission_id": os.environ.get("RAY_JOB_SUBMISSION_ID"), "trial_seconds": max(spans, default=None)}
        self.ledger.record_job(self.plan.cluster, self.job_id, "tune", self.name, started_at=self.started,
                               ended_at=time.time(), extra=extra)
        by_trial: dict[str, dict[str, Any]] = {}
        for trial in sorted({u.trial for u in usages if u.trial}):
            by_trial[trial] = meter.describe(u for u in usages if u.trial == trial)
        for loss in losses:
            if loss.trial in by_trial:
                by_trial[loss.trial]["lost_steps"] = by_trial[loss.trial].get("lost_steps", 0) + loss.steps
                by_trial[loss.trial]["lost_cost"] = by_trial[loss.trial].get("lost_cost", 0.0) + loss.cost
        totals = {**meter.describe(usages), "lost_cost": sum(x.cost for x in losses),
                  "lost_steps": sum(x.steps for x in losses), "job_id": self.job_id}
        totals["currency"] = totals["currency"] or self.plan.catalog.currency
        try:
            from mlplatform.cost import report as _report

            metrics.publish(_report.report(self.ledger, cluster=self.plan.cluster, job=self.job_id, by="trial")["rows"],
                            currency=totals["currency"])
        except Exception as e:  # noqa: BLE001 - metrics are best effort; the ledger holds the figures
            print(f"[mlplatform.tune] cost metrics not published: {e}", flush=True)
        return totals, by_trial


def _status(error, metrics: dict[str, Any]) -> str:
    """ERROR; NO RESULT (stopped before its first report); STOPPED (early: ASHA, budget, target); DONE."""
    if error:
        return "ERROR"
    if not metrics.get("step"):
        return "NO RESULT"
    return "DONE" if metrics["step"] == metrics.get("total_steps") else "STOPPED"


def _by_trial(usages) -> dict[str, list]:
    out: dict[str, list] = {}
    for u in usages:
        if u.trial:
            out.setdefault(u.trial, []).append(u)
    return out


def _results(spec: TuneSpec, base, the_plan: TunePlan, grid, totals, by_trial, results_dir: str) -> TuneResult:
    rows = []
    for r in grid:
        m = r.metrics or {}
        trial_id = m.get("trial_id")
        metered = by_trial.get(trial_id or "", {})
        rows.append({
            "trial": trial_id,
            "config": {k: v for k, v in (r.config or {}).items()},
            spec.metric: m.get(spec.metric),
            "metric": m.get(spec.metric),
            "metric_name": spec.metric,
            # The ledger's figure where metered (Ray's records), else the trial's own running figure.
            COST_KEY: metered.get("cost", m.get(COST_KEY, 0.0)),
            "reported_cost": m.get(COST_KEY),
            "lost_cost": metered.get("lost_cost", 0.0),
            "lost_steps": metered.get("lost_steps", 0),
            "steps": m.get("step"),
            "market": ",".join(metered.get("markets", [])) or m.get("market"),
            "region": ",".join(metered.get("regions", [])) or m.get("region"),
            "status": _status(r.error, m),
            "artifact": f"{the_plan_runs(spec)}/{spec.name}-{trial_id}/artifact",
        })
    rows.sort(key=lambda row: row["trial"] or "")
    if not any(row["metric"] is not None for row in rows):
        raise TuneFailed(f"{spec.name}: no trial reported `{spec.metric}`; see `ray job logs` for the trials' errors")
    front = pareto.front(rows, spec.metric, spec.mode)
    winner = pareto.best(rows, spec)
    currency = totals["currency"]
    _storage.check_write(results_dir, "storage_path")
    os.makedirs(results_dir, exist_ok=True)
    table = pareto.table(rows, spec.metric, spec.mode, currency=currency)
    Path(results_dir, "pareto.md").write_text(table + "\n")
    pareto.plot(rows, f"{results_dir}/pareto.png", spec.metric, spec.mode, title=spec.name, currency=currency,
                winner=winner.row)
    Path(results_dir, "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    best = {"trial": winner.row, "why": winner.why, "target_reached": winner.target_reached, "cost": totals,
            "forecast": the_plan.to_json(), "front": [r["trial"] for r in front]}
    Path(results_dir, "best.json").write_text(json.dumps(best, indent=2, default=str))
    print(table, flush=True)
    registered = _register(spec, base, winner.row, front, totals) if spec.registration and winner.row else None
    return TuneResult(spec.name, results_dir, rows, front, winner.row, winner.why, totals, registered)


def the_plan_runs(spec: TuneSpec) -> str:
    return f"{_storage.absolute(spec.storage_path).rstrip('/')}/{spec.name}/runs"


def _register(spec: TuneSpec, base, winner, front, totals) -> str:
    """The winning trial's model into the registry, with its search in the lineage.

    A winner the search stopped early (a target reached, a budget spent) has no final
    weights yet: its run is finished first, resumed from its last checkpoint, and what that
    costs is in the job's ledger like the rest of the search.
    """
    from mlplatform import registry
    from mlplatform.train import train

    artifact = winner["artifact"]
    if not os.path.isfile(os.path.join(artifact, layout.METADATA)):
        print(f"[mlplatform.tune] finishing trial {winner['trial']}'s run for the registry", flush=True)
        trial = trial_train_spec(base, winner["config"], f"{spec.name}-{winner['trial']}")
        artifact = train(trial.model_copy(update={"storage_path": the_plan_runs(spec)})).artifact_dir
    extra = {
        "tuning": {
            "experiment": spec.name, "trial": winner["trial"], "config": winner["config"],
            "metric": spec.metric, "value": winner["metric"], "trial_cost": winner[COST_KEY],
            "search_cost": totals["cost"], "currency": totals["currency"],
            "pareto": [{k: r[k] for k in ("trial", "metric", COST_KEY)} for r in front],
        },
    }
    v = registry.register(artifact, spec.registration.name, root=spec.registration.root,
                          lineage={"job_id": _job_id(), "extra": extra})
    return f"{spec.registration.name}@{v.version}"


def _job_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_job_id()


__all__ = ["TuneFailed", "TuneResult", "tune"]
