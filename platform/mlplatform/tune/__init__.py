"""Cost-aware hyperparameter tuning on Ray Tune: spend is the clock, the budget the limit.

    spec = config.load("jobs/configs/tune-digits.yaml", TuneSpec)
    base = load_train_spec(spec, "jobs/configs/tune-digits.yaml")   # train YAML + overrides
    print(plan(spec, base).describe())                               # placement and cost forecast
    result = tune(spec, "jobs/configs/tune-digits.yaml")             # trials, ledger, Pareto front

Searchers, schedulers and the budget guards (`mlplatform.tune._search`, `.budget`) import
Ray Tune; `.pareto` imports matplotlib to plot. Importing this package imports neither.
"""

from mlplatform.tune.spec import TuneSpec, check_space, load_train_spec, param_space, trial_train_spec

_LAZY = {"plan": "mlplatform.tune._plan", "TunePlan": "mlplatform.tune._plan", "tune": "mlplatform.tune._run",
         "TuneResult": "mlplatform.tune._run", "TuneFailed": "mlplatform.tune._run"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["TuneSpec", "check_space", "load_train_spec", "param_space", "trial_train_spec", *_LAZY]
