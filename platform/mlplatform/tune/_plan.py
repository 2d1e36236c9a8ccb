"""Before any trial starts: where trials may run, on which market, and what the search will cost.

The forecast prices one trial as (start-up + steps × seconds per step) × the workers' share of
the node they would get, by the price catalog; the seconds come from this experiment's earlier
runs in the ledger when there are any, else from stated assumptions (printed as such).
Everything a user can get wrong here fails now, naming the field: a market with no live node
or no price, a budget below one trial, a spot-only search on a cluster without spot nodes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from mlplatform.cluster.spec import MARKET_LABEL, REGION_LABEL
from mlplatform.errors import CostError, PreflightError, SpecError
from mlplatform.tune.spec import TuneSpec

# Assumed until this experiment has run once (the ledger then supplies measured figures):
# Ray Train's worker group, DeepSpeed and the data shard take about a minute to start on a
# busy 2-core machine, and a small model's step is tens of milliseconds.
ASSUMED_STARTUP_S = 60.0
ASSUMED_STEP_S = 0.05
# The trial's own driver (Tune's function actor, which starts Ray Train): a sliver of a CPU
# on an on-demand node, where a spot notice cannot take it.
DRIVER_RESOURCES = {"CPU": 0.1}
# What a trial's per-epoch reports (the ones Tune sees) carry, by task (mlplatform.train.loop).
_EPOCH_METRICS = {
    "classification": ("val_accuracy", "val_loss"),
    "regression": ("val_rmse", "val_loss"),
    "causal_lm": ("val_perplexity", "val_loss", "tokens_per_s"),
}
_EVERY_REPORT = ("loss", "samples_per_s", "peak_memory_mb_max")


@dataclass(frozen=True)
class TunePlan:
    """What `mlplatform tune plan` prints and `tune()` runs by."""

    spec: TuneSpec
    cluster: str
    policy: Any
    catalog: Any
    markets: list[str]
    selectors: dict[str, dict[str, str]]
    driver_selector: dict[str, str]
    driver_resources: dict[str, float]
    groups: dict[str, list[str]]  # market → node groups it may use
    trial_steps: int
    trial_seconds: float
    seconds_source: str
    trial_cost: float  # one full trial on the preferred market
    trial_cost_fallback: float | None
    off_peak: dict[str, Any] | None = field(default=None)

    @property
    def search_cost(self) -> float:
        return self.trial_cost * self.spec.num_samples

    def to_json(self) -> dict[str, Any]:
        return {
            "markets": self.markets, "groups": self.groups, "selectors": self.selectors,
            "trial_steps": self.trial_steps, "trial_seconds": round(self.trial_seconds, 1),
            "seconds_source": self.seconds_source, "trial_cost": self.trial_cost,
            "trial_cost_fallback": self.trial_cost_fallback, "search_cost": self.search_cost,
            "budget": self.spec.budget.amount, "currency": self.catalog.currency, "off_peak": self.off_peak,
        }

    def describe(self) -> str:
        s, cur = self.spec, self.catalog.currency
        lines = [
            f"{s.name}: up to {s.num_samples} trials, {s.max_concurrent_trials} at a time, "
            f"searcher {s.searcher.name}, scheduler {s.scheduler.name} (clock: {s.scheduler.time_attr})",
            f"  markets      {' then '.join(self.markets)}; node groups "
            + "; ".join(f"{m}: {', '.join(g) or 'none live'}" for m, g in self.groups.items()),
            f"  placement    workers {self.selectors[self.markets[0]]}; trial drivers {self.driver_selector}",
            f"  one trial    {self.trial_steps} steps, ~{self.trial_seconds:.0f} s ({self.seconds_source}), "
            f"{self.trial_cost:.6f} {cur} on {self.markets[0]}"
            + (f", {self.trial_cost_fallback:.6f} {cur} on {self.markets[1]}" if self.trial_cost_fallback else ""),
            f"  forecast     {self.search_cost:.6f} {cur} if all {s.num_samples} trials run in full"
            + (f"; budget {s.budget.amount} {cur} stops it sooner" if s.budget.amount is not None else ""),
        ]
        if s.budget.time_s:
            lines.append(f"  time budget  {s.budget.time_s:.0f} s")
        if self.off_peak:
            lines.append(f"  off-peak     starts {self.off_peak['starts']} (waits {self.off_peak['wait_s']:.0f} s); "
                         f"saves {self.off_peak['saving']:.0%}: {self.search_cost * (1 - self.off_peak['saving']):.6f} {cur}")
        return "\n".join(lines)

    def wait_for_start(self) -> None:
        """With `start: off-peak`, sleep until the catalog's cheap window opens."""
        if self.spec.start == "off-peak":
            self.catalog.wait_for_off_peak(self.spec.name)


def plan(spec: TuneSpec, base, *, now: dt.datetime | None = None) -> TunePlan:
    """Check the search against the connected cluster, its residency policy and its price catalog.

    Raises:
        PreflightError, ResidencyError, CostError, SpecError: before any trial starts.
    """
    import os

    import ray

    from mlplatform import residency
    from mlplatform.cluster.inventory import from_ray_nodes
    from mlplatform.cost import catalog as _catalog
    from mlplatform.train.preflight import preflight

    from mlplatform.tune.spec import check_space

    check_space(spec, base)
    _check_metric(spec, base)
    catalog = _catalog.current()
    if catalog is None:
        raise CostError(
            "the cluster has no price catalog, so a search cannot be priced or budgeted; add `price_catalog: "
            "../prices/example.yaml` (or your own) to the cluster spec and start it again"
        )
    policy = residency.current()
    selector = preflight(base, policy=policy)
    if MARKET_LABEL in base.placement.selector() and spec.market.prefer == "spot":
        raise PreflightError(
            f"Got `{MARKET_LABEL}: {base.placement.selector()[MARKET_LABEL]}` in the trials' placement while "
            "`market.prefer` is spot; set `overrides.placement.allow_spot: true` and leave the market label out "
            "(the search adds it)"
        )
    markets = [spec.market.prefer]
    if spec.market.prefer == "spot" and spec.market.fallback == "on-demand":
        markets.append("on-demand")
    nodes = [n for n in from_ray_nodes(ray.nodes()) if n.alive]
    selectors = {m: {**selector, MARKET_LABEL: m} for m in markets}
    groups = {m: sorted({n.group for n in nodes if n.matches(selectors[m])}) for m in markets}
    if not any(groups.values()):
        raise PreflightError(
            f"Got `market: {spec.market.model_dump()}`, but no live node in the allowed places ({selector}) is "
            f"{' or '.join(markets)}; " + ("add `fallback: on-demand` under `market`, or add spot nodes to the cluster"
                                            if markets == ["spot"] else "add nodes of that market to the cluster")
        )
    worker = dict(base.resources_per_worker)
    rates = {m: _rate(catalog, [n for n in nodes if n.matches(selectors[m])], worker, base.num_workers) for m in markets}
    region_part = {k: v for k, v in selector.items() if k == REGION_LABEL}
    driver_selector = {**region_part, MARKET_LABEL: "on-demand"}
    if not any(n.matches(driver_selector) for n in nodes):
        driver_selector = region_part
    steps = _trial_steps(base)
    seconds, source = _trial_seconds(spec, steps)
    markets = [m for m in markets if groups[m]]  # a market with no live node left (spot gone) is skipped
    trial_cost = rates[markets[0]] * seconds
    fallback_cost = rates[markets[1]] * seconds if len(markets) > 1 else None
    if spec.budget.amount is not None and spec.budget.amount < trial_cost:
        raise CostError(
            f"Got {spec.budget.amount} {spec.budget.currency} for `budget.amount`, below one trial's forecast "
            f"{trial_cost:.6f} {catalog.currency}; raise the budget or make trials shorter (`overrides`)"
        )
    if spec.budget.currency != catalog.currency:
        raise CostError(
            f"Got {spec.budget.currency} for `budget.currency`, but the cluster's catalog prices in "
            f"{catalog.currency}; state the budget in {catalog.currency}"
        )
    off_peak = None
    if spec.start == "off-peak":
        if catalog.off_peak is None:
            raise CostError(f"Got `start: off-peak`, but catalog {catalog.name} has no `off_peak` window; use `start: now`")
        now = now or dt.datetime.now(dt.timezone.utc)
        starts = catalog.next_off_peak(now)
        off_peak = {"starts": starts.isoformat(timespec="minutes"), "wait_s": max(0.0, (starts - now).total_seconds()),
                    "saving": catalog.off_peak_saving()}
    return TunePlan(
        spec=spec, cluster=os.environ.get(residency.CLUSTER_ENV) or "local", policy=policy, catalog=catalog,
        markets=markets, selectors=selectors, driver_selector=driver_selector,
        driver_resources=dict(DRIVER_RESOURCES), groups=groups, trial_steps=steps, trial_seconds=seconds,
        seconds_source=source, trial_cost=trial_cost, trial_cost_fallback=fallback_cost, off_peak=off_peak,
    )


def _check_metric(spec: TuneSpec, base) -> None:
    reported = (*_EPOCH_METRICS[base.task.value], *_EVERY_REPORT)
    if spec.metric not in reported:
        raise SpecError(
            f"Got {spec.metric!r} for `metric`, which a {base.task.value} trial never reports; "
            f"use one of {', '.join(reported)}"
        )


def _rate(catalog, nodes, worker: dict[str, float], num_workers: int) -> float:
    """Spend per second of a trial's workers on the dearest of `nodes` (a forecast errs high)."""
    from mlplatform.cost.catalog import share

    if not nodes:
        return 0.0
    per_node = [share(worker, n.resources) * catalog.price(n.region, n.group, n.market) for n in nodes]
    return max(per_node) * num_workers / 3600


def _trial_steps(base) -> int:
    """Optimizer steps of one full trial, from the training data's row count."""
    import tempfile

    import pyarrow.parquet as pq

    from mlplatform.train import data as _data

    if base.max_steps and not base.epochs:
        return base.max_steps
    paths = _data.resolve_paths(base, f"{tempfile.gettempdir()}/mlplatform/datasets")
    try:
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in pq.ParquetDataset(paths.train).files)
    except Exception:  # noqa: BLE001 - a forecast, not a check: preflight already read the data
        rows = 0
    per_epoch = max(1, rows // base.num_workers // (base.micro_batch_size * base.accum_steps)) if rows else 50
    steps = per_epoch * (base.epochs or 1)
    return min(steps, base.max_steps) if base.max_steps else steps


def _trial_seconds(spec: TuneSpec, steps: int) -> tuple[float, str]:
    """One trial's seconds: from this experiment's earlier runs in the ledger, else assumed."""
    from mlplatform.cost.ledger import open_ledger

    try:
        past = [j for j in open_ledger().jobs() if j.name == spec.name and (j.extra or {}).get("trial_seconds")]
    except Exception:  # noqa: BLE001 - no ledger yet: the assumptions stand
        past = []
    if past:
        return float(past[-1].extra["trial_seconds"]), f"measured in job {past[-1].job_id}"
    return ASSUMED_STARTUP_S + steps * ASSUMED_STEP_S, (
        f"assumed: {ASSUMED_STARTUP_S:.0f} s start-up + {ASSUMED_STEP_S} s/step until a run is measured"
    )


__all__ = ["TunePlan", "plan"]
