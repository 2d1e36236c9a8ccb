"""TuneSpec: what a tune YAML may say, the TrainSpec it starts from, and each trial's."""

import numpy as np
import pytest

from conftest import REPO
from mlplatform import config
from mlplatform.errors import SpecError
from mlplatform.train.spec import TrainSpec
from mlplatform.tune.spec import TuneSpec, check_space, load_train_spec, param_space, trial_train_spec

SHIPPED = REPO / "jobs" / "configs" / "tune-digits.yaml"

MINIMAL = """\
name: t
train: train.yaml
search_space:
  optimizer.lr: {loguniform: [0.001, 0.1]}
"""

TRAIN = """\
name: base
model: {ref: builtin:digits_mlp, kwargs: {hidden: [64]}}
dataset: {path: builtin:digits}
task: classification
epochs: 2
global_batch_size: 32
micro_batch_size: 32
num_workers: 1
placement: {label_selector: {ray.io/availability-region: me-central-1}, allow_spot: true}
"""


def parse(extra: str = "", base: str = MINIMAL) -> TuneSpec:
    return config.parse(base + extra, TuneSpec, source="tune.yaml")


def problem(extra: str, base: str = MINIMAL) -> str:
    with pytest.raises(SpecError) as e:
        parse(extra, base)
    return str(e.value)


@pytest.fixture
def tune_dir(tmp_path):
    (tmp_path / "train.yaml").write_text(TRAIN)
    return tmp_path


def write(tune_dir, extra: str = "", base: str = MINIMAL) -> tuple[TuneSpec, str]:
    path = tune_dir / "tune.yaml"
    path.write_text(base + extra)
    return config.load(path, TuneSpec), str(path)


# ---- the shipped spec


def test_shipped_tune_digits_loads_and_its_trials_validate():
    spec = config.load(SHIPPED, TuneSpec)
    base = load_train_spec(spec, str(SHIPPED))
    assert (base.num_workers, base.epochs, base.zero_stage, base.global_batch_size) == (1, 4, 0, 32)
    # The selector is replaced whole (digits.yaml's node-group pin is gone); spot is allowed.
    assert base.placement.label_selector == {"ray.io/availability-region": "me-central-1"}
    assert base.placement.allow_spot and base.classification == "uae-restricted"
    assert base.checkpoint.every_n_steps == 15 and base.checkpoint.keep_last == 2  # merged, not replaced
    assert base.optimizer.name == "adamw"  # untouched sections come from digits.yaml
    check_space(spec, base)
    rng = np.random.default_rng(0)
    space = param_space(spec)
    for i in range(20):
        trial = trial_train_spec(base, {k: d.sample(random_state=rng) for k, d in space.items()}, f"tune-digits-{i:08d}")
        assert 0.0005 <= trial.optimizer.lr <= 0.2 and trial.model.kwargs["hidden"] in ([32], [128], [256])
    assert spec.objective.kind == "min_cost_to_target" and spec.objective.target == 0.95
    assert spec.scheduler.time_attr == "cost" and spec.budget.amount == 0.05


# ---- the spec alone


def test_defaults_and_register_key():
    spec = parse("register: {name: digits-best}\n")
    assert (spec.metric, spec.mode, spec.start, spec.storage_path) == ("val_accuracy", "max", "now", "/tmp/mlplatform/tune")
    assert (spec.scheduler.name, spec.scheduler.time_attr, spec.scheduler.grace_fraction) == ("asha", "cost", 0.25)
    assert spec.registration.name == "digits-best" and spec.registration.root is None


def test_unknown_search_path_is_rejected_naming_it_and_its_line():
    msg = problem("  optimizer.lrr: {uniform: [0.1, 0.2]}\n")
    assert "search_space.optimizer.lrr (line 5)" in msg
    assert "`lrr` is not a field of optimizer" in msg and "lr" in msg


@pytest.mark.parametrize("path,why", [
    ("name", "run name is set from the tune spec's name"),
    ("epochs.x", "single value, not a section"),
    ("optimizer/lr", "dotted TrainSpec path"),
])
def test_bad_search_paths(path, why):
    assert why in problem(f"  {path}: {{uniform: [0.1, 0.2]}}\n")


def test_paths_into_mapping_fields_are_allowed():
    spec = parse("  model.kwargs.hidden: {choice: [[32], [64]]}\n  placement.label_selector.x: {choice: [a, b]}\n")
    assert set(spec.search_space) == {"optimizer.lr", "model.kwargs.hidden", "placement.label_selector.x"}


@pytest.mark.parametrize("domain,why", [
    ("{uniform: [0.2, 0.1]}", "needs lo < hi"),
    ("{uniform: [0.1, 0.1]}", "needs lo < hi"),
    ("{loguniform: [0, 0.1]}", "needs lo > 0"),
    ("{randint: [4, 2]}", "needs lo < hi"),
    ("{choice: []}", "at least one value"),
    ("{choice: [1, 1]}", "twice"),
    ("{uniform: [0.1, 0.2], choice: [1]}", "exactly one of"),
    ("{}", "exactly one of"),
    ("{normal: [0, 1]}", "unknown field"),
    ("{uniform: [0.1, .inf]}", "finite"),
])
def test_bad_domains_name_the_path(domain, why):
    msg = problem(f"  optimizer.weight_decay: {domain}\n")
    assert "search_space.optimizer.weight_decay" in msg and why in msg, msg


@pytest.mark.parametrize("extra,field,why", [
    ("objective: {kind: min_cost_to_target}\n", "objective.target", "needs a target"),
    ("objective: {kind: max_metric, target: 0.9}\n", "objective.target", "only by kind min_cost_to_target"),
    ("objective: {kind: max_metric_within_budget}\n", "budget.amount", "needs budget.amount"),
    ("objective: {kind: pareto}\nsearcher: {name: optuna_tpe}\n", "searcher.name", "optuna_multi"),
    ("scheduler: {name: pbt}\nsearcher: {name: optuna_tpe}\n", "searcher.name", "use searcher random"),
    ("metric: cost\n", "metric", "spend every trial reports"),
    ("overrides: {epochz: 3}\n", "overrides.epochz", "not a field of TrainSpec"),
    ("overrides: {optimizer: {lrr: 3}}\n", "overrides.optimizer.lrr", "not a field of optimizer"),
    ("overrides: {name: other}\n", "overrides.name", "cannot be searched or overridden"),
    ("name: " + "x" * 49 + "\n", "name", "1-48 characters"),
    ("budget: {amount: 1, currency: usd}\n", "budget.currency", "pattern"),
    ("num_samples: 0\n", "num_samples", "greater than or equal to 1"),
    ("scheduler: {grace_fraction: 1}\n", "scheduler.grace_fraction", "less than 1"),
    ("register: {name: Digits}\n", "register.name", "lowercase"),
])
def test_cross_field_checks_name_the_field(extra, field, why):
    msg = problem(extra)
    assert f"- {field}" in msg and why in msg, msg


def test_pareto_with_multi_or_random_and_min_cost_with_target_are_fine():
    assert parse("objective: {kind: pareto}\nsearcher: {name: optuna_multi}\n").objective.kind == "pareto"
    assert parse("objective: {kind: pareto}\nsearcher: {name: random}\n").searcher.name == "random"
    assert parse("objective: {kind: min_cost_to_target, target: 0.9}\n").objective.target == 0.9


# ---- against the TrainSpec


def test_train_path_is_relative_to_the_tune_spec_and_overrides_merge(tune_dir):
    spec, path = write(tune_dir, "overrides: {epochs: 3, optimizer: {weight_decay: 0.1}, model: {kwargs: {width: 8}}}\n")
    base = load_train_spec(spec, path)
    assert base.epochs == 3 and base.optimizer.weight_decay == 0.1 and base.optimizer.name == "adamw"
    assert base.model.kwargs == {"width": 8}  # a mapping-valued field is replaced whole
    assert base.model.ref == "builtin:digits_mlp"


def test_missing_train_file_names_train_and_the_folder(tune_dir):
    spec, path = write(tune_dir, base=MINIMAL.replace("train.yaml", "nope.yaml"))
    with pytest.raises(SpecError, match=r"Got 'nope.yaml' for `train`.*relative to the tune spec's folder"):
        load_train_spec(spec, path)


def test_an_override_trainspec_rejects_is_named(tune_dir):
    spec, path = write(tune_dir, "overrides: {global_batch_size: 40}\n")
    with pytest.raises(SpecError, match=r"`overrides.global_batch_size` \(global_batch_size\): got 40"):
        load_train_spec(spec, path)


def test_market_label_and_spot_policy_conflicts(tune_dir):
    spec, path = write(tune_dir, "overrides: {placement: {label_selector: {ray.io/market-type: spot}}}\n")
    with pytest.raises(SpecError, match="the tuner adds the market label"):
        load_train_spec(spec, path)
    spec, path = write(tune_dir, "overrides: {placement: {allow_spot: false}}\n")
    with pytest.raises(SpecError, match=r"`market.prefer`.*allow_spot: true"):
        load_train_spec(spec, path)
    spec, path = write(tune_dir, "overrides: {placement: {allow_spot: false}}\nmarket: {prefer: on-demand}\n")
    assert not load_train_spec(spec, path).placement.allow_spot


def test_trial_train_spec_sets_dotted_paths_and_names_the_run():
    base = TrainSpec.model_validate(config.parse(TRAIN, TrainSpec).model_dump())
    trial = trial_train_spec(base, {"optimizer.lr": np.float64(0.05), "model.kwargs.hidden": [16, 16],
                                    "global_batch_size": np.int64(64)}, "t-abc")
    assert trial.name == "t-abc" and trial.optimizer.lr == 0.05 and trial.model.kwargs == {"hidden": [16, 16]}
    assert trial.global_batch_size == 64 and base.optimizer.lr == 1e-3  # base untouched
    with pytest.raises(SpecError, match=r"`search_space.optimizer.lr`: got 20.0"):
        trial_train_spec(base, {"optimizer.lr": 20.0}, "t-abc")
    with pytest.raises(SpecError, match=r"`search_space.optimizer.lrr`"):
        trial_train_spec(base, {"optimizer.lrr": 0.1}, "t-abc")


def test_check_space_names_every_path_that_cannot_be_sampled(tune_dir):
    spec, path = write(tune_dir, (
        "  global_batch_size: {randint: [16, 70]}\n"
        "  optimizer.name: {choice: [adamw, lamb]}\n"
        "  optimizer.weight_decay: {uniform: [0.5, 2]}\n"
    ))
    with pytest.raises(SpecError) as e:
        check_space(spec, load_train_spec(spec, path))
    msg = str(e.value)
    assert "search_space.global_batch_size` (randint): value 16" in msg
    assert "values that work include [32, 64]" in msg
    assert "search_space.optimizer.name` (choice): value 'lamb'" in msg
    assert "search_space.optimizer.weight_decay` (uniform): value 2.0" in msg
    assert "optimizer.lr" not in msg


def test_param_space_is_flat_dotted_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    spec = parse("  global_batch_size: {randint: [1, 3]}\n  model.kwargs.hidden: {choice: [[32], [64]]}\n")
    space = param_space(spec)
    assert isinstance(space["optimizer.lr"], Float) and (space["optimizer.lr"].lower, space["optimizer.lr"].upper) == (0.001, 0.1)
    assert isinstance(space["model.kwargs.hidden"], Categorical) and space["model.kwargs.hidden"].categories == [[32], [64]]
    ints = space["global_batch_size"]
    assert isinstance(ints, Integer)
    # Ours is inclusive, Tune's upper bound exclusive: 3 must be drawn.
    assert set(ints.sample(size=200, random_state=np.random.default_rng(0))) == {1, 2, 3}
