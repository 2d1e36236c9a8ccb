"""Ray Tune schedulers and searchers built from a TuneSpec.

Both are given the spec's metric and mode here, so the runner leaves TuneConfig's
`metric`/`mode` unset (Tune refuses a scheduler that has its own and is given them again).
Every searcher this returns is a `Searcher` (random too), so the budget guard can wrap it
and Tune's `max_concurrent_trials` can put its ConcurrencyLimiter around that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from ray.tune.search import Searcher

from mlplatform.tune.spec import COST_KEY, TuneSpec, param_space

if TYPE_CHECKING:
    from ray.tune.schedulers import TrialScheduler

# Result key each `scheduler.time_attr` reads: the trial's spend so far, or its optimizer step
# (what mlplatform.train's loop reports as `step`). Both only grow within a trial.
TIME_KEYS = {"cost": COST_KEY, "step": "step"}


def build_scheduler(spec: TuneSpec, *, full_trial: float) -> TrialScheduler | None:
    """ASHA, PBT or None for `spec.scheduler`.

    Args:
        full_trial: one full trial's forecast in the unit of `scheduler.time_attr` (currency
            for `cost`, optimizer steps for `step`); rungs and intervals are fractions of it.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining

    s = spec.scheduler
    if s.name == "none":
        return None
    if not full_trial > 0:
        raise ValueError(f"full_trial must be > 0 (one full trial's forecast {s.time_attr}); got {full_trial}")
    time_attr = TIME_KEYS[s.time_attr]
    if s.name == "asha":
        # ASHA's rungs work on floats (grace·rf^k, k while ≤ max_t), so spend can be the clock.
        # stop_last_trials=False: a trial whose spend overruns the forecast still finishes its
        # epochs; the budget stopper, not ASHA, caps money.
        return AsyncHyperBandScheduler(
            time_attr=time_attr,
            metric=spec.metric,
            mode=spec.mode,
            max_t=full_trial,
            grace_period=s.grace_fraction * full_trial,
            reduction_factor=s.reduction_factor,
            stop_last_trials=False,
        )
    return PopulationBasedTraining(
        time_attr=time_attr,
        metric=spec.metric,
        mode=spec.mode,
        perturbation_interval=s.perturbation_fraction * full_trial,
        hyperparam_mutations=mutations(spec),
    )


def mutations(spec: TuneSpec) -> dict[str, Any]:
    """PBT's hyperparam_mutations: numeric ranges as Tune domains, choices as lists.

    PBT perturbs a domain's value by multiplying it (×1.2 / ×0.8), which a choice such as
    [32] cannot take; a list is shifted to a neighbouring value instead.
    """
    space = param_space(spec)
    return {path: (list(d.choice or []) if d.kind == "choice" else space[path]) for path, d in spec.search_space.items()}


def build_searcher(spec: TuneSpec) -> Searcher:
    """Random, Optuna TPE (on the metric) or Optuna multi-objective (metric and cost), seeded.

    The search space reaches the searcher from Tuner's param_space (`spec.param_space`) through
    `set_search_properties`, as Tune does for any searcher.
    """
    s = spec.searcher
    if s.name == "random":
        return RandomSearcher(metric=spec.metric, mode=spec.mode, seed=s.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=s.seed)
    if s.name == "optuna_tpe":
        return OptunaSearch(metric=spec.metric, mode=spec.mode, sampler=sampler)
    # Multi-objective: Optuna keeps a front of (metric, cost); Tune then sends it no
    # intermediate results (no pruning), and ASHA still stops trials on the metric alone.
    return OptunaSearch(metric=[spec.metric, COST_KEY], mode=[spec.mode, "min"], sampler=sampler)


class RandomSearcher(Searcher):
    """Independent random samples of the param space from one seeded generator.

    Tune's own random search (BasicVariantGenerator) is a SearchAlgorithm, not a Searcher, so
    it cannot sit inside the budget guard or a ConcurrencyLimiter; this one can.
    """

    def __init__(self, metric: str | None = None, mode: str | None = None, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._space: dict[str, Any] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        from ray.tune.search.sample import Domain

        if self._space:
            return False
        self._space = {k: v for k, v in config.items() if isinstance(v, Domain)}
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if not self._space:
            raise RuntimeError("RandomSearcher has no search space: pass Tuner(param_space=spec.param_space(...)).")
        return {k: _plain(d.sample(random_state=self._rng)) for k, d in self._space.items()}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # random search learns nothing from results

    def get_state(self) -> dict:
        return {"seed": self._seed, "rng": self._rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self._seed = state["seed"]
        self._rng = np.random.default_rng(self._seed)
        self._rng.bit_generator.state = state["rng"]

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump({**self.get_state(), "space": self._space}, f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.set_state(state)
        self._space = state["space"]


def _plain(value: Any) -> Any:
    """Numpy scalars (Tune's samplers return them) as Python values, so configs stay plain."""
    return value.item() if isinstance(value, np.generic) else value
