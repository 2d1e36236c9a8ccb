"""Budget guards: Spend bookkeeping, BudgetSearcher admission, BudgetStopper cut-offs (Tune objects, no cluster)."""

import warnings

import pytest
from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from conftest import REPO
from mlplatform import config
from mlplatform.tune._search import RandomSearcher, build_searcher
from mlplatform.tune.budget import BudgetSearcher, BudgetStopper, Spend, guards
from mlplatform.tune.spec import TuneSpec, param_space

SHIPPED = config.load(REPO / "jobs" / "configs" / "tune-digits.yaml", TuneSpec)
FINISHED = Searcher.FINISHED


@pytest.fixture(autouse=True)
def _list_choices_are_fine_in_memory():
    # Optuna warns that list-valued choices ([32], [128]) cannot go to persistent storage;
    # OptunaSearch keeps its study in memory, where they work.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Choices for a categorical distribution")
        yield


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def reports(costs, metric=None):
    """Cumulative cost reports as Tune delivers them (training_iteration 1, 2, ...)."""
    return [{"cost": c, "training_iteration": i + 1, **({"val_accuracy": metric} if metric is not None else {})}
            for i, c in enumerate(costs)]


def random_budget_searcher(spend, **kw) -> BudgetSearcher:
    inner = RandomSearcher(metric="val_accuracy", mode="max", seed=0)
    s = BudgetSearcher(inner, spend, **{"amount": 1.0, "forecast": 0.4, "num_samples": 10, **kw})
    assert s.set_search_properties(None, None, param_space(SHIPPED))
    return s


# ---- Spend


def test_spend_takes_cumulative_costs_and_counts_each_result_once():
    spend = Spend()
    for r in reports([0.1, 0.25, 0.45]):
        spend.record("a", r)
        spend.record("a", r)  # the stopper and the searcher both see every result
    spend.record("b", {"cost": 0.05, "training_iteration": 1})
    spend.record("b", {"loss": 1.0, "training_iteration": 2})  # no cost: nothing to take
    assert spend.spent("a") == pytest.approx(0.45) and spend.last_increment("a") == pytest.approx(0.2)
    assert spend.total == pytest.approx(0.5) and spend.last_increment("b") == 0.05  # first report: all of it
    assert spend.last_increment("c") == 0.0
    assert spend.running == {"a", "b"}
    spend.finish("a")
    spend.record("a", {"cost": 0.45, "training_iteration": 3})  # the final result, again
    assert spend.running == {"b"} and spend.total == pytest.approx(0.5)
    assert spend.committed(forecast=0.4) == pytest.approx(0.35)  # b may still spend 0.4 - 0.05


# ---- BudgetStopper


def test_stopper_stops_the_trial_at_the_report_before_the_budget_is_crossed():
    spend = Spend()
    stopper = BudgetStopper(spend, amount=0.9)
    decisions = [stopper("a", r) for r in reports([0.2, 0.4, 0.6, 0.8, 1.0])[:4]]
    # After 0.6 the next ~0.2 step still fits (0.8 <= 0.9); after 0.8 it would not (1.0 > 0.9).
    assert decisions == [False, False, False, True]
    assert stopper.stop_all() and "budget" in spend.stop_reason
    assert spend.total <= 0.9


def test_stop_all_counts_every_running_trials_next_step():
    spend = Spend()
    stopper = BudgetStopper(spend, amount=1.0)
    for a, b in zip(reports([0.1, 0.2, 0.3]), reports([0.15, 0.3, 0.45])):
        assert not stopper("a", a) and not stopper("b", b)
    # 0.75 spent; a's next ~0.1 and b's next ~0.15 would make 1.0: not over yet.
    assert not stopper.stop_all()
    stopper("a", {"cost": 0.4, "training_iteration": 4})
    assert stopper.stop_all()  # 0.85 + 0.1 + 0.15 > 1.0
    # Worst case the in-flight steps land: spend ends <= amount + one step per running trial.
    assert spend.total + spend.last_increment("a") + spend.last_increment("b") <= 1.0 + 0.1 + 0.15


@pytest.mark.parametrize("mode,values,stop_at", [
    ("max", [0.5, 0.93, 0.951, 0.99], 2),
    ("min", [0.9, 0.3, 0.05, 0.01], 2),
])
def test_target_reached_stops_the_search(mode, values, stop_at):
    spend = Spend()
    target = 0.95 if mode == "max" else 0.1
    stopper = BudgetStopper(spend, amount=None, metric="m", mode=mode, target=target)
    decisions = []
    for i, v in enumerate(values):
        decisions.append(stopper("a", {"cost": 0.01 * (i + 1), "training_iteration": i + 1, "m": v}))
        if decisions[-1]:
            break
    assert decisions == [False] * stop_at + [True]
    assert stopper.stop_all() and stopper.reached == ("a", values[stop_at])
    assert stopper("b", {"cost": 0.01, "training_iteration": 1}) is False  # no metric: no decision
    with pytest.raises(ValueError, match="needs the metric"):
        BudgetStopper(spend, target=0.9)


def test_time_budget():
    clock = Clock()
    spend = Spend(clock=clock)
    stopper = BudgetStopper(spend, time_s=60)
    searcher = random_budget_searcher(spend, amount=None, time_s=60)
    assert not stopper.stop_all() and isinstance(searcher.suggest("t0"), dict)
    clock.now += 61
    assert stopper.stop_all() and searcher.suggest("t1") == FINISHED
    assert "time budget" in spend.stop_reason


# ---- BudgetSearcher


def test_searcher_admits_trials_while_their_forecast_fits():
    spend = Spend()
    s = random_budget_searcher(spend)  # 1.0 budget, 0.4 forecast per trial
    assert isinstance(s.suggest("t1"), dict) and isinstance(s.suggest("t2"), dict)
    assert s.suggest("t3") is None  # 0 spent + 0.8 committed + 0.4 > 1.0: not now
    # t1 is stopped early (ASHA) at 0.1: 0.1 + 0.4 (t2) + 0.4 fits again.
    s.on_trial_result("t1", {"cost": 0.1, "training_iteration": 1, "val_accuracy": 0.2})
    s.on_trial_complete("t1", {"cost": 0.1, "training_iteration": 1, "val_accuracy": 0.2})
    assert isinstance(s.suggest("t3"), dict)
    assert s.suggested == 3 and spend.running == {"t2", "t3"}


def test_searcher_finishes_when_spent_when_nothing_fits_and_after_num_samples():
    spend = Spend()
    s = random_budget_searcher(spend, amount=1.0, forecast=0.6)
    assert isinstance(s.suggest("t1"), dict)
    assert s.suggest("t2") is None
    s.on_trial_complete("t1", {"cost": 0.5, "training_iteration": 5})
    # Nothing runs and 0.5 + 0.6 > 1.0: no trial will ever fit, so the search ends (not a hang).
    assert s.suggest("t2") == FINISHED and "does not fit" in spend.stop_reason

    spend = Spend()
    s = random_budget_searcher(spend, amount=1.0, forecast=0.1)
    s.suggest("t1")
    s.on_trial_result("t1", {"cost": 1.0, "training_iteration": 1})
    assert s.suggest("t2") == FINISHED and "budget spent" in spend.stop_reason

    s = random_budget_searcher(Spend(), amount=None, num_samples=2)
    assert isinstance(s.suggest("a"), dict) and isinstance(s.suggest("b"), dict)
    assert s.suggest("c") == FINISHED


def test_searcher_finishes_once_the_stopper_stops_the_search():
    spend = Spend()
    s = random_budget_searcher(spend, amount=None)
    stopper = BudgetStopper(spend, metric="val_accuracy", target=0.95)
    s.suggest("t1")
    assert stopper("t1", {"cost": 0.01, "training_iteration": 1, "val_accuracy": 0.96})
    assert s.suggest("t2") == FINISHED


def test_optuna_behind_the_guard_sees_only_results_with_its_metric():
    import optuna

    # Bare OptunaSearch reads result[metric] on every result: a report between evaluations breaks it.
    bare = build_searcher(SHIPPED)
    bare.set_search_properties(None, None, param_space(SHIPPED))
    bare.suggest("x")
    with pytest.raises(KeyError):
        bare.on_trial_result("x", {"cost": 0.001, "training_iteration": 1})

    spend = Spend()
    s = BudgetSearcher(build_searcher(SHIPPED), spend, amount=0.05, forecast=0.01, num_samples=8)
    s.set_search_properties(None, None, param_space(SHIPPED))
    assert s.metric == "val_accuracy" and s.mode == "max"
    s.suggest("t1")
    s.on_trial_result("t1", {"cost": 0.001, "training_iteration": 1})
    s.on_trial_result("t1", {"cost": 0.002, "training_iteration": 2, "val_accuracy": 0.8})
    s.on_trial_result("t1", {"cost": 0.003, "training_iteration": 3})
    # The last result lacks the metric: Optuna still records the trial as complete, at 0.8.
    s.on_trial_complete("t1", {"cost": 0.003, "training_iteration": 3})
    (t,) = s.searcher._ot_study.trials
    assert t.state == optuna.trial.TrialState.COMPLETE and t.value == 0.8
    assert spend.total == pytest.approx(0.003) and not spend.running


def test_guards_inside_tunes_concurrency_limiter_and_search_generator(tmp_path):
    # What Tuner builds around our searcher: SearchGenerator(ConcurrencyLimiter(BudgetSearcher(...))).
    search_alg, stopper = guards(SHIPPED, build_searcher(SHIPPED), forecast=0.01)
    assert search_alg.spend is stopper.spend and stopper.target == 0.95 and search_alg.amount == 0.05
    limited = ConcurrencyLimiter(search_alg, max_concurrent=SHIPPED.max_concurrent_trials)
    gen = SearchGenerator(limited)
    assert gen.set_search_properties(None, None, param_space(SHIPPED))
    assert isinstance(limited.suggest("a"), dict) and isinstance(limited.suggest("b"), dict)
    assert limited.suggest("c") is None  # concurrency, not money
    limited.on_trial_result("a", {"cost": 0.004, "training_iteration": 1, "val_accuracy": 0.5})
    # Tune checkpoints the experiment by walking `.searcher` wrappers' get_state(): it must work.
    gen.save_to_dir(str(tmp_path), "s")
    fresh_alg, _ = guards(SHIPPED, build_searcher(SHIPPED), forecast=0.01)
    SearchGenerator(ConcurrencyLimiter(fresh_alg, max_concurrent=2)).restore_from_dir(str(tmp_path))
    assert fresh_alg.suggested == 2 and fresh_alg.spend.total == pytest.approx(0.004)
    assert isinstance(fresh_alg.searcher, OptunaSearch)


def test_tuneconfig_metric_does_not_override_a_multi_objective_searcher():
    spec = TuneSpec.model_validate({**SHIPPED.model_dump(by_alias=True), "searcher": {"name": "optuna_multi", "seed": 0},
                                    "objective": {"kind": "pareto", "target": None}})
    s = BudgetSearcher(build_searcher(spec), Spend(), amount=None, forecast=0.01, num_samples=2)
    assert s.set_search_properties("val_accuracy", "max", param_space(spec))  # as Tune passes TuneConfig's
    assert s.metric == ["val_accuracy", "cost"] and len(s.searcher._ot_study.directions) == 2
