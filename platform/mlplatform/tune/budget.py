"""Money and time limits on a Tune search: what has been spent, who may start, who must stop.

Every trial reports its cumulative spend as `result["cost"]`. One `Spend` is shared by a
`BudgetSearcher` (which starts a trial only when its forecast fits what is left) and a
`BudgetStopper` (which stops trials before the next step would cross the budget); both live
in the Tune driver process and see every result (Tune calls the stopper on each result
first, the searcher on results of trials that go on, and the searcher when a trial ends).
With reports every step, spend ends at most one step's cost per running trial over the
amount, and usually under it.

    spend = Spend()
    search_alg = BudgetSearcher(build_searcher(spec), spend, amount=0.05, forecast=0.01, num_samples=8)
    stopper = BudgetStopper(spend, amount=0.05, metric="val_accuracy", mode="max", target=0.95)
    # or: search_alg, stopper = guards(spec, build_searcher(spec), forecast=0.01)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ray.tune.search import Searcher
from ray.tune.stopper import Stopper

from mlplatform.tune.spec import COST_KEY, TuneSpec


class Spend:
    """Each trial's spend so far (from its reported cumulative `cost`), and which trials run."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        self._spent: dict[str, float] = {}
        self._increment: dict[str, float] = {}
        self._iteration: dict[str, int] = {}
        self.running: set[str] = set()
        self._finished: set[str] = set()
        self.stop_reason: str | None = None

    @property
    def total(self) -> float:
        """Spend of every trial so far."""
        return sum(self._spent.values())

    @property
    def elapsed(self) -> float:
        """Seconds since the search started (since this object was made)."""
        return self._clock() - self.started

    def spent(self, trial_id: str) -> float:
        return self._spent.get(trial_id, 0.0)

    def reported(self, trial_id: str) -> bool:
        """Whether the trial has reported a cost."""
        return trial_id in self._spent

    def last_increment(self, trial_id: str) -> float:
        """What the trial's last report added: the guess of its next one (0 before any report)."""
        return self._increment.get(trial_id, 0.0)

    def start(self, trial_id: str) -> None:
        """The trial was suggested: it counts as running until `finish`."""
        if trial_id not in self._finished:
            self.running.add(trial_id)

    def finish(self, trial_id: str) -> None:
        self.running.discard(trial_id)
        self._finished.add(trial_id)

    def record(self, trial_id: str, result: dict[str, Any] | None) -> None:
        """Take the trial's cumulative `cost` from a result; the same result twice counts once."""
        if not result or result.get(COST_KEY) is None:
            return
        cost = float(result[COST_KEY])
        if not math.isfinite(cost):
            return
        iteration = result.get("training_iteration")
        if iteration is not None:
            if iteration <= self._iteration.get(trial_id, -1):
                return  # seen already (the stopper and the searcher both get each result)
            self._iteration[trial_id] = iteration
        before = self._spent.get(trial_id)
        if before is not None and iteration is None and cost == before:
            return
        # A first report's increment is all it cost so far (start-up included): a cautious guess.
        self._increment[trial_id] = max(0.0, cost - (before or 0.0))
        self._spent[trial_id] = max(cost, before or 0.0)
        if trial_id not in self._finished:
            self.running.add(trial_id)

    def committed(self, forecast: float) -> float:
        """What running trials are still expected to spend if each runs to its full forecast."""
        return sum(max(0.0, forecast - self.spent(t)) for t in self.running)

    def stop(self, reason: str) -> None:
        """Stop the whole search (first reason kept): the searcher says FINISHED, the stopper stop_all."""
        self.stop_reason = self.stop_reason or reason

    def state(self) -> dict[str, Any]:
        return {
            "elapsed": self.elapsed, "spent": dict(self._spent), "increment": dict(self._increment),
            "iteration": dict(self._iteration), "running": sorted(self.running),
            "finished": sorted(self._finished), "stop_reason": self.stop_reason,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.started = self._clock() - state["elapsed"]
        self._spent, self._increment = dict(state["spent"]), dict(state["increment"])
        self._iteration = dict(state["iteration"])
        self.running, self._finished = set(state["running"]), set(state["finished"])
        self.stop_reason = state["stop_reason"]


class BudgetSearcher(Searcher):
    """Starts a trial only when the budget can pay for it; FINISHED once the budget is spent.

    `suggest` returns None ("not now") while spent + what running trials are still forecast
    to spend + one more trial's forecast exceeds `amount` and some trial runs (one may be
    stopped early and free its share), and FINISHED when nothing runs and still no trial
    fits, once spend reaches `amount`, `time_s` has passed, `num_samples` were started, or
    the shared Spend was stopped (e.g. a trial reached the target).
    """

    def __init__(self, searcher: Searcher, spend: Spend, *, amount: float | None, forecast: float,
                 num_samples: int, time_s: float | None = None):
        # `searcher` (the attribute name ConcurrencyLimiter uses) lets Tune save the inner one too.
        self.searcher = searcher
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.spend = spend
        self.amount = amount
        self.forecast = forecast
        self.num_samples = num_samples
        self.time_s = time_s
        self.suggested = 0
        # Last value of each objective per trial: results without the metric (reports between
        # evaluations) must not reach Optuna, which reads result[metric] on every result.
        self._seen: dict[str, dict[str, Any]] = {}

    @property
    def _objectives(self) -> list[str]:
        metric = self.searcher.metric
        return [m for m in (metric if isinstance(metric, list) else [metric]) if m]

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        # The inner searcher's own metric wins: TuneConfig(metric=...) would turn a multi-objective
        # OptunaSearch ([metric, cost]) into a single-objective one.
        if self.searcher.metric:
            metric, mode = None, None
        ok = self.searcher.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.searcher.metric, self.searcher.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str) -> dict | str | None:
        s = self.spend
        if self.amount is not None and s.total >= self.amount:
            s.stop(f"budget spent: {s.total:.4g} of {self.amount:.4g}")
        if self.time_s is not None and s.elapsed > self.time_s:
            s.stop(f"time budget of {self.time_s:g} s used")
        if s.stop_reason or self.suggested >= self.num_samples:
            return Searcher.FINISHED
        if self.amount is not None and s.total + s.committed(self.forecast) + self.forecast > self.amount:
            if s.running:
                return None  # a running trial may end under its forecast and leave room
            s.stop(f"budget: another trial's forecast ({self.forecast:.4g}) does not fit in "
                   f"{self.amount - s.total:.4g} left")
            return Searcher.FINISHED
        config = self.searcher.suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.suggested += 1
        s.start(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.spend.record(trial_id, result)
        objectives = self._objectives
        if objectives and all(result.get(m) is not None for m in objectives):
            self._seen[trial_id] = {m: result[m] for m in objectives}
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.spend.record(trial_id, result)
        self.spend.finish(trial_id)
        # The final result may lack the metric (a report between evaluations): give the inner
        # searcher the trial's last values, so Optuna records it complete rather than pruned.
        seen = self._seen.pop(trial_id, {})
        if result is not None or seen:
            result = {**(result or {})}
            for m, v in seen.items():
                if result.get(m) is None:
                    result[m] = v
            if result.get(COST_KEY) is None and self.spend.reported(trial_id):
                result[COST_KEY] = self.spend.spent(trial_id)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"suggested": self.suggested, "seen": dict(self._seen), "spend": self.spend.state()}

    def set_state(self, state: dict) -> None:
        self.suggested = state["suggested"]
        self._seen = dict(state["seen"])
        self.spend.load(state["spend"])


class BudgetStopper(Stopper):
    """Stops trials before the budget is crossed, after `time_s`, or once one reaches the target.

    `stop_all` is true once spent + every running trial's last increment exceeds `amount`
    (their next reports would cross it), once `time_s` has passed, or, with a `target`, once
    any trial's metric reached it (max: >= target, min: <= target). A single trial is
    stopped when its own next increment would cross `amount`, or when it reaches the target.
    """

    def __init__(self, spend: Spend, *, amount: float | None = None, time_s: float | None = None,
                 metric: str | None = None, mode: str = "max", target: float | None = None):
        if target is not None and not metric:
            raise ValueError("BudgetStopper: a target needs the metric it applies to")
        self.spend = spend
        self.amount = amount
        self.time_s = time_s
        self.metric = metric
        self.mode = mode
        self.target = target
        self.reached: tuple[str, float] | None = None  # (trial, metric) that first reached the target

    def __call__(self, trial_id: str, result: dict) -> bool:
        s = self.spend
        s.record(trial_id, result)
        if self.target is not None and self._reaches(result.get(self.metric)):
            if self.reached is None:
                self.reached = (trial_id, float(result[self.metric]))
                s.stop(f"trial {trial_id} reached {self.metric} {result[self.metric]:.4g} "
                       f"(target {self.target:g})")
            return True
        return self.amount is not None and s.total + s.last_increment(trial_id) > self.amount

    def stop_all(self) -> bool:
        s = self.spend
        if self.amount is not None:
            ahead = sum(s.last_increment(t) for t in s.running)
            if s.total + ahead > self.amount:
                s.stop(f"budget: {s.total:.4g} spent and the running trials' next steps (~{ahead:.4g}) "
                       f"would cross {self.amount:.4g}")
        if self.time_s is not None and s.elapsed > self.time_s:
            s.stop(f"time budget of {self.time_s:g} s used")
        return s.stop_reason is not None

    def _reaches(self, value: Any) -> bool:
        if value is None or self.target is None:
            return False
        try:
            value = float(value)
        except (TypeError, ValueError):
            return False
        if math.isnan(value):
            return False
        return value >= self.target if self.mode == "max" else value <= self.target


def guards(spec: TuneSpec, searcher: Searcher, *, forecast: float,
           spend: Spend | None = None) -> tuple[BudgetSearcher, BudgetStopper]:
    """The searcher wrapped in the spec's budget, and its stopper, sharing one Spend.

    Args:
        forecast: one full trial's forecast spend, in `budget.currency`.
    """
    spend = spend or Spend()
    b = spec.budget
    target = spec.objective.target if spec.objective.kind == "min_cost_to_target" else None
    return (
        BudgetSearcher(searcher, spend, amount=b.amount, forecast=forecast, num_samples=spec.num_samples,
                       time_s=b.time_s),
        BudgetStopper(spend, amount=b.amount, time_s=b.time_s, metric=spec.metric, mode=spec.mode, target=target),
    )
