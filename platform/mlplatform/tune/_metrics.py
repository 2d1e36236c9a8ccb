"""The search's metrics, recorded by a Ray Tune callback in the search's driver.

Tune calls its callbacks in the driver for every trial start, result and end, so one
process sees the whole search: trials running and ended (by status), the best metric so
far, and the spend against the budget. The ended-trials counter outlives the driver in its
node's metrics agent; the gauges go ~20 s after it exits (mlplatform.observability.metrics).
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from mlplatform.observability import record
from mlplatform.tune.spec import COST_KEY, TuneSpec


class SearchMetrics(Callback):
    """Records mlplatform_tune_* for one search; never raises (observability.record)."""

    def __init__(self, spec: TuneSpec):
        self.search, self.metric, self.mode = spec.name, spec.metric, spec.mode
        self.currency, self.budget = spec.budget.currency, spec.budget.amount
        self.running: set[str] = set()
        self.spent: dict[str, float] = {}
        self.best: float | None = None

    def setup(self, **info: Any) -> None:
        record.set_gauge("mlplatform_tune_trials_running", 0, {"search": self.search})
        if self.budget is not None:
            record.set_gauge("mlplatform_tune_budget", self.budget, self._money())

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.running.add(trial.trial_id)
        record.set_gauge("mlplatform_tune_trials_running", len(self.running), {"search": self.search})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get(COST_KEY) is not None:
            self.spent[trial.trial_id] = float(result[COST_KEY])  # cumulative per trial
            record.set_gauge("mlplatform_tune_spend", sum(self.spent.values()), self._money())
        value = result.get(self.metric)
        if isinstance(value, (int, float)):
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = float(value)
            record.set_gauge("mlplatform_tune_best_metric", self.best, {"search": self.search, "metric": self.metric})

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        # A trial Tune ends before its last step was stopped early (ASHA, the budget, a target reached).
        done = last.get("step") is not None and last.get("step") == last.get("total_steps")
        self._ended(trial.trial_id, "done" if done else "stopped")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial.trial_id, "error")

    def _ended(self, trial_id: str, status: str) -> None:
        self.running.discard(trial_id)
        record.set_gauge("mlplatform_tune_trials_running", len(self.running), {"search": self.search})
        record.inc("mlplatform_tune_trials_ended_total", 1, {"search": self.search, "status": status})

    def _money(self) -> dict[str, str]:
        return {"search": self.search, "currency": self.currency}
