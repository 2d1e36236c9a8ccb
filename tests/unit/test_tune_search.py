"""Schedulers and searchers built from a TuneSpec: real Ray Tune and Optuna objects, no cluster."""

import warnings

import numpy as np
import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from conftest import REPO
from mlplatform import config
from mlplatform.tune._search import RandomSearcher, build_scheduler, build_searcher, mutations
from mlplatform.tune.spec import TuneSpec, param_space

SHIPPED = config.load(REPO / "jobs" / "configs" / "tune-digits.yaml", TuneSpec)


@pytest.fixture(autouse=True)
def _list_choices_are_fine_in_memory():
    # Optuna warns that list-valued choices ([32], [128]) cannot go to persistent storage;
    # OptunaSearch keeps its study in memory, where they work.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Choices for a categorical distribution")
        yield


def variant(**changes) -> TuneSpec:
    data = SHIPPED.model_dump(by_alias=True)
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return TuneSpec.model_validate(data)


def trial(trial_id: str) -> Trial:
    return Trial("__fake", config={}, trial_id=trial_id, stub=True)


def test_asha_rungs_are_fractions_of_one_trials_forecast_spend():
    full = 0.012  # currency: one trial's forecast spend
    sched = build_scheduler(SHIPPED, full_trial=full)
    assert isinstance(sched, AsyncHyperBandScheduler) and sched._time_attr == "cost"
    milestones = [m for m, _ in sched._brackets[0]._rungs]
    assert milestones == pytest.approx([full, full / 2, full / 4])  # grace 0.25, reduction factor 2

    trials = [trial(f"t{i}") for i in range(3)]
    for t in trials:
        sched.on_trial_add(None, t)
    # Under the grace spend nobody is judged; at the first rung (0.003) the worse half stops.
    assert sched.on_trial_result(None, trials[0], {"cost": 0.002, "val_accuracy": 0.1}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials[0], {"cost": 0.0031, "val_accuracy": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials[1], {"cost": 0.0032, "val_accuracy": 0.5}) == TrialScheduler.STOP
    # A result without the metric (a report between evaluations) is not judged.
    assert sched.on_trial_result(None, trials[2], {"cost": 0.004}) == TrialScheduler.CONTINUE
    # A trial that overruns its forecast is not cut at max_t: the budget stopper caps money.
    assert sched.on_trial_result(None, trials[0], {"cost": 0.02, "val_accuracy": 0.95}) == TrialScheduler.CONTINUE


def test_step_time_attr_none_and_bad_forecast():
    assert build_scheduler(variant(scheduler={"time_attr": "step"}), full_trial=180)._time_attr == "step"
    assert build_scheduler(variant(scheduler={"name": "none"}), full_trial=1.0) is None
    with pytest.raises(ValueError, match="full_trial must be > 0"):
        build_scheduler(SHIPPED, full_trial=0)


def test_pbt_mutates_numbers_by_domain_and_choices_by_list():
    spec = variant(scheduler={"name": "pbt", "perturbation_fraction": 0.5}, searcher={"name": "random"})
    sched = build_scheduler(spec, full_trial=0.01)
    assert isinstance(sched, PopulationBasedTraining)
    assert sched._perturbation_interval == pytest.approx(0.005) and sched._time_attr == "cost"
    m = mutations(spec)
    assert m["model.kwargs.hidden"] == [[32], [128], [256]]
    assert m["optimizer.lr"].lower == 0.0005 and m["optimizer.lr"].upper == 0.2


def _drive(searcher, n: int, multi: bool = False) -> list[dict]:
    assert searcher.set_search_properties(None, None, param_space(SHIPPED))
    configs = []
    for i in range(n):
        tid = f"t{i}"
        cfg = searcher.suggest(tid)
        configs.append(cfg)
        if not multi:  # Tune sends no intermediate results to a multi-objective OptunaSearch
            searcher.on_trial_result(tid, {"val_accuracy": 0.5, "training_iteration": 1, "cost": 0.001})
        searcher.on_trial_complete(tid, {"val_accuracy": 0.6 + i / 100, "cost": 0.002 * (i + 1), "training_iteration": 2})
    return configs


def _in_space(cfg: dict) -> bool:
    return (set(cfg) == {"optimizer.lr", "model.kwargs.hidden", "optimizer.weight_decay"}
            and 0.0005 <= cfg["optimizer.lr"] <= 0.2 and 0 <= cfg["optimizer.weight_decay"] <= 0.05
            and cfg["model.kwargs.hidden"] in ([32], [128], [256]))


def test_optuna_tpe_with_optuna_5_suggests_dotted_configs_and_learns():
    assert optuna.__version__ == "5.0.0"
    searcher = build_searcher(SHIPPED)
    assert isinstance(searcher, OptunaSearch) and searcher.metric == "val_accuracy" and searcher.mode == "max"
    configs = _drive(searcher, 12)
    assert all(_in_space(c) for c in configs)
    study = searcher._ot_study
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 12
    assert study.best_value == pytest.approx(0.71)
    # Seeded: the same spec suggests the same first trial.
    again = build_searcher(SHIPPED)
    again.set_search_properties(None, None, param_space(SHIPPED))
    assert again.suggest("x") == configs[0]


def test_optuna_multi_optimizes_metric_and_cost():
    searcher = build_searcher(variant(searcher={"name": "optuna_multi"}, objective={"kind": "pareto", "target": None}))
    assert searcher.metric == ["val_accuracy", "cost"] and searcher.mode == ["max", "min"]
    configs = _drive(searcher, 6, multi=True)
    assert all(_in_space(c) for c in configs)
    study = searcher._ot_study
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert study.best_trials  # a front of (accuracy, cost)


def test_random_searcher_is_seeded_plain_and_in_range():
    spec = variant(searcher={"name": "random", "seed": 3})
    a, b = build_searcher(spec), build_searcher(spec)
    assert isinstance(a, RandomSearcher)
    configs = _drive(a, 10)
    assert _drive(b, 10) == configs
    assert all(_in_space(c) for c in configs)
    assert all(type(c["optimizer.lr"]) is float for c in configs)
    assert len({c["optimizer.lr"] for c in configs}) == 10
    # State round trip continues the same stream.
    state = a.get_state()
    nxt = a.suggest("n")
    a.set_state(state)
    assert a.suggest("n") == nxt
    assert not a.set_search_properties(None, None, param_space(spec))  # the space is set once


def test_random_searcher_without_space_says_how_to_fix():
    with pytest.raises(RuntimeError, match="param_space"):
        RandomSearcher(seed=0).suggest("t")


def test_numpy_free_configs_from_randint():
    spec = variant(searcher={"name": "random"}, search_space={
        **SHIPPED.model_dump()["search_space"], "global_batch_size": {"randint": [1, 4]}})
    s = build_searcher(spec)
    s.set_search_properties(None, None, param_space(spec))
    values = [s.suggest(f"t{i}")["global_batch_size"] for i in range(50)]
    assert set(values) == {1, 2, 3, 4} and all(type(v) is int for v in values)
    assert not any(isinstance(v, np.generic) for v in values)
