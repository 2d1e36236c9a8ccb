"""TuneSpec: a cost-aware hyperparameter search over one TrainSpec.

A tune spec names a TrainSpec YAML (`train`, relative to the tune spec's own file),
`overrides` applied to every trial, and a `search_space` keyed by dotted TrainSpec paths
(`optimizer.lr`, `model.kwargs.hidden`). Everything that needs only the spec is checked
when it loads; `load_train_spec` and `check_space` check it against the TrainSpec.

Search-space keys reach Ray Tune as they are: Tune passes flat keys containing dots through
its variant generator, `SearchGenerator` and `OptunaSearch` (which flattens on "/", not "."),
so a trial's config is `{"optimizer.lr": 0.01, ...}` and `trial_train_spec` sets each path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from mlplatform import config
from mlplatform.config import Spec
from mlplatform.errors import SpecError
from mlplatform.train.spec import MARKET_LABEL, TrainSpec

# Trials run as "<name>-<trial id>" (Tune ids are 8 characters), which must fit TrainSpec's 64.
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_][\w-]*)*$")
# The registry's model-name rule (mlplatform.registry checks it again when registering).
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# The result key every trial reports its cumulative spend under; not usable as `metric`.
COST_KEY = "cost"
# randint ranges up to this many values are checked value by value, wider ones at their ends.
_EXHAUSTIVE = 256


def _fail(title: str, problems: list[tuple[tuple[Any, ...], Any, str]]) -> None:
    """Raise one ValidationError with a problem per field, so each names its own field and line."""
    raise ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("value_error", "{msg}", {"msg": msg}), loc=loc, input=value)
            for loc, value, msg in problems
        ],
    )


class Domain(Spec):
    """One hyperparameter's range: exactly one of `uniform`, `loguniform`, `randint`, `choice`."""

    uniform: tuple[float, float] | None = Field(None, description="[lo, hi]: a float drawn uniformly, lo < hi.")
    loguniform: tuple[float, float] | None = Field(
        None, description="[lo, hi]: a float drawn uniformly in log space, 0 < lo < hi (learning rates)."
    )
    randint: tuple[int, int] | None = Field(None, description="[lo, hi]: an integer from lo to hi, both included.")
    choice: list[Any] | None = Field(
        None, description="[v1, v2, ...]: one of these values, any YAML value (e.g. [[32], [128]] for hidden sizes)."
    )

    @model_validator(mode="after")
    def _one(self) -> Domain:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ValueError(f"set exactly one of uniform, loguniform, randint or choice (got {got})")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("`choice` needs at least one value")
            dupes = [v for i, v in enumerate(self.choice) if v in self.choice[:i]]
            if dupes:
                raise ValueError(f"`choice` lists {dupes[0]!r} twice; list each value once")
            return self
        lo, hi = getattr(self, kind)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"`{kind}` bounds must be finite numbers")
        if lo >= hi:
            raise ValueError(f"`{kind}` needs lo < hi (got [{lo}, {hi}]); for a fixed value use `overrides` instead")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"`loguniform` needs lo > 0 (got {lo}); use `uniform` for ranges that include 0")
        return self

    @property
    def kind(self) -> str:
        """`uniform`, `loguniform`, `randint` or `choice`."""
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)

    def values_to_check(self) -> list[Any]:
        """Values `check_space` validates: both ends, every choice, every integer of a small randint."""
        if self.kind == "choice":
            return list(self.choice or [])
        lo, hi = getattr(self, self.kind)
        if self.kind == "randint" and hi - lo < _EXHAUSTIVE:
            return list(range(lo, hi + 1))
        return [lo, hi]

    def to_tune(self) -> Any:
        """The Ray Tune domain (tune.uniform / loguniform / randint / choice)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.choice or []))
        lo, hi = getattr(self, self.kind)
        if self.kind == "randint":
            return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive, ours inclusive.
        return getattr(tune, self.kind)(lo, hi)


class SchedulerSpec(Spec):
    """Which trials stop early (ASHA), are mutated (PBT), or all run to the end (none)."""

    name: Literal["asha", "pbt", "none"] = Field(
        "asha", description="`asha` (async successive halving), `pbt` (population-based training) or `none`."
    )
    time_attr: Literal["cost", "step"] = Field(
        "cost",
        description="What ASHA's rungs and PBT's intervals count: `cost` (each trial's spend so far, so rungs are "
        "money) or `step` (optimizer steps).",
    )
    grace_fraction: float = Field(
        0.25, gt=0, lt=1,
        description="ASHA: share of one full trial's forecast (spend or steps) a trial runs before it may be stopped.",
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the best 1/reduction_factor of trials at each rung.")
    perturbation_fraction: float = Field(
        0.25, gt=0, le=1,
        description="PBT: perturb every this share of one full trial's forecast (spend or steps).",
    )


class SearcherSpec(Spec):
    """How the next trial's hyperparameters are chosen."""

    name: Literal["random", "optuna_tpe", "optuna_multi"] = Field(
        "optuna_tpe",
        description="`random`, `optuna_tpe` (Optuna TPE on `metric`) or `optuna_multi` (Optuna on `metric` and cost "
        "together, for a Pareto front).",
    )
    seed: int = Field(0, ge=0, description="Seed of the sampler, so a search can be repeated.")


class MarketSpec(Spec):
    """Which capacity market trials run on."""

    prefer: Literal["spot", "on-demand"] = Field("spot", description="Run trials on `spot` or `on-demand` nodes.")
    fallback: Literal["on-demand", "none"] = Field(
        "on-demand",
        description="When no spot node is free: `on-demand` runs the trial there, `none` waits for spot "
        "(ignored when prefer is on-demand).",
    )


class BudgetSpec(Spec):
    """Limits on the whole search."""

    amount: float | None = Field(
        None, gt=0, description="Most money the search may spend, in `currency`; absent: no money limit."
    )
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code of `amount` and every cost, e.g. USD.")
    time_s: float | None = Field(None, gt=0, description="Most wall-clock seconds the search may run; absent: no limit.")


class ObjectiveSpec(Spec):
    """What "best" means when the search ends."""

    kind: Literal["max_metric", "max_metric_within_budget", "min_cost_to_target", "pareto"] = Field(
        "max_metric",
        description="`max_metric` (best metric), `max_metric_within_budget` (best metric among trials that cost at "
        "most budget.amount), `min_cost_to_target` (cheapest trial reaching `target`; the search stops once one "
        "does) or `pareto` (the metric/cost front).",
    )
    target: float | None = Field(None, description="Metric value to reach (min_cost_to_target only).")


class RegisterSpec(Spec):
    """Where the winning trial's model is registered."""

    name: str = Field(description="Registry model name (lowercase letters, digits, '.', '_', '-').")
    root: str | None = Field(None, description="Registry root; absent: the platform's default registry.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _MODEL_NAME.match(v):
            raise ValueError("must be 1-64 of lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v


class TuneSpec(Spec):
    """A hyperparameter search over one TrainSpec, stopped by money, time or a target."""

    name: str = Field(description="Experiment name; trials run as <name>-<trial id> under <storage_path>/<name>.")
    train: str = Field(description="TrainSpec YAML every trial starts from, relative to this file's folder.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Applied to every trial's TrainSpec, merged section by section (e.g. {epochs: 4, optimizer: "
        "{name: sgd}}); a mapping-valued field such as placement.label_selector or model.kwargs is replaced whole.",
    )
    search_space: dict[str, Domain] = Field(
        description="Dotted TrainSpec path → range, e.g. {optimizer.lr: {loguniform: [1e-4, 1e-1]}}."
    )
    metric: str = Field("val_accuracy", description="Reported metric the search optimizes.")
    mode: Literal["max", "min"] = Field("max", description="`max` or `min`imize `metric`.")
    num_samples: int = Field(8, ge=1, description="Most trials the search starts.")
    max_concurrent_trials: int = Field(
        2, ge=1, description="Trials running at once (Tune does not count Ray Train workers' resources)."
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Early stopping or mutation of trials.")
    searcher: SearcherSpec = Field(default_factory=SearcherSpec, description="How trials' hyperparameters are chosen.")
    market: MarketSpec = Field(default_factory=MarketSpec, description="Spot or on-demand capacity for trials.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Money and time limits on the whole search.")
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec, description="How the winning trial is picked.")
    start: Literal["now", "off-peak"] = Field(
        "now", description="`now`, or `off-peak`: wait for the price catalog's cheaper hours."
    )
    storage_path: str = Field(
        "/tmp/mlplatform/tune",
        description="Local directory or pyarrow-filesystem URI for Tune's experiment state and trial runs; shared "
        "by every node when nodes are on different machines.",
    )
    # `register` names ABCMeta.register on every pydantic model: the YAML key is an alias.
    registration: RegisterSpec | None = Field(
        None, alias="register", description="Register the winning model in the registry; absent: don't."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _EXPERIMENT_NAME.match(v):
            raise ValueError(
                "must be 1-48 characters of letters, digits, '.', '_' or '-', starting with a letter or digit "
                "(trial runs add '-<trial id>' within TrainSpec's 64)"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TuneSpec:
        problems: list[tuple[tuple[Any, ...], Any, str]] = []
        if not self.search_space:
            problems.append((("search_space",), {}, "add at least one range, e.g. {optimizer.lr: {loguniform: [1e-4, 1e-1]}}"))
        for path in self.search_space:
            why = _path_problem(path)
            if why:
                problems.append((("search_space", path), path, why))
        for path, value in _override_leaves(self.overrides, TrainSpec, ()):
            why = _path_problem(".".join(path))
            if why:
                problems.append((("overrides", *path), value, why))
        if self.metric == COST_KEY:
            problems.append((("metric",), self.metric, f"`{COST_KEY}` is the spend every trial reports; name a model "
                             "metric such as val_accuracy, and use objective.kind to trade it against cost"))
        obj = self.objective
        if obj.kind == "min_cost_to_target" and obj.target is None:
            problems.append((("objective", "target"), None, "min_cost_to_target needs a target, e.g. target: 0.95"))
        if obj.kind != "min_cost_to_target" and obj.target is not None:
            problems.append((("objective", "target"), obj.target,
                             f"is used only by kind min_cost_to_target (kind is {obj.kind}); drop it or change kind"))
        if obj.kind == "max_metric_within_budget" and self.budget.amount is None:
            problems.append((("budget", "amount"), None, "max_metric_within_budget needs budget.amount"))
        if obj.kind == "pareto" and self.searcher.name == "optuna_tpe":
            problems.append((("searcher", "name"), "optuna_tpe", "optimizes the metric alone; for a pareto objective "
                             "use optuna_multi (metric and cost together) or random"))
        if self.scheduler.name == "pbt" and self.searcher.name != "random":
            problems.append((("searcher", "name"), self.searcher.name, "scheduler pbt mutates running trials' configs behind the "
                             "searcher's back; use searcher random with scheduler pbt, or scheduler asha"))
        if problems:
            _fail("TuneSpec", problems)
        return self


# ---- dotted TrainSpec paths


def _section(annotation: Any) -> type[BaseModel] | None:
    """The Spec class a field holds (through Optional), or None for a plain value."""
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_mapping(annotation: Any) -> bool:
    return any(get_origin(arg) is dict or arg is dict for arg in (annotation, *get_args(annotation)))


def _path_problem(path: str) -> str | None:
    """Why `path` names no TrainSpec value (None when it does)."""
    if not _PATH.match(path):
        return "must be a dotted TrainSpec path such as optimizer.lr or model.kwargs.hidden"
    parts = path.split(".")
    if parts[0] == "name":
        return "each trial's run name is set from the tune spec's name; it cannot be searched or overridden"
    model: type[BaseModel] = TrainSpec
    for i, part in enumerate(parts):
        fields = model.model_fields
        where = ".".join(parts[:i]) or "TrainSpec"
        if part not in fields:
            return f"`{part}` is not a field of {where}; fields are: {', '.join(fields)}"
        if i == len(parts) - 1:
            return None
        annotation = fields[part].annotation
        sub = _section(annotation)
        if sub is not None:
            model = sub
        elif _is_mapping(annotation):
            return None  # free-form keys beneath (model.kwargs, placement.label_selector, ...)
        else:
            return f"`{'.'.join(parts[: i + 1])}` is a single value, not a section; use the path `{'.'.join(parts[: i + 1])}`"
    return None


def _override_leaves(over: dict[str, Any], model: type[BaseModel], prefix: tuple[str, ...]):
    """(path parts, value) of each override, descending into sections given as mappings."""
    for key, value in over.items():
        field = model.model_fields.get(key)
        sub = _section(field.annotation) if field else None
        if sub is not None and isinstance(value, dict):
            yield from _override_leaves(value, sub, (*prefix, key))
        else:
            yield (*prefix, key), value


def _merge(base: dict[str, Any], over: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`base` with `over` merged into its sections; plain and mapping-valued fields are replaced."""
    out = dict(base)
    for key, value in over.items():
        field = model.model_fields.get(key)
        sub = _section(field.annotation) if field else None
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, sub)
        else:
            out[key] = value
    return out


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays (as samplers return them) as Python values pydantic accepts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    """(dotted field, why) for each problem pydantic found."""
    out = []
    for p in error.errors(include_url=False):
        loc = ".".join(str(x) for x in p["loc"]) or "(top level)"
        msg = p["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if p["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append((loc, f"got {p.get('input')!r}; {msg}"))
    return out


# ---- the TrainSpec a tune spec starts from, and each trial's


def load_train_spec(spec: TuneSpec, tune_spec_path: str | Path) -> TrainSpec:
    """Read `spec.train` (relative to the tune spec's folder), apply `spec.overrides`, validate.

    Raises:
        SpecError: the file is missing or not YAML (naming `train`), or the merged spec is not a
            valid TrainSpec (naming `overrides.<field>` where an override set the field).
    """
    folder = Path(tune_spec_path).parent
    path = Path(spec.train) if Path(spec.train).is_absolute() else folder / spec.train
    try:
        data, _ = config.read_yaml(path.read_text(), str(path))
    except FileNotFoundError:
        raise SpecError(
            f"Got {spec.train!r} for `train`; {path} does not exist. `train` is relative to the tune spec's folder "
            f"({folder}); check it with `ls {path.parent}`."
        ) from None
    except OSError as e:
        raise SpecError(f"Got {spec.train!r} for `train`; {path} is not a readable file ({e.strerror}).") from None
    except SpecError as e:
        raise SpecError(f"Got {spec.train!r} for `train`; {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"Got {spec.train!r} for `train`; {path} must be a YAML mapping (a TrainSpec).")
    try:
        train = TrainSpec.model_validate(_merge(data, spec.overrides, TrainSpec))
    except ValidationError as e:
        overridden = {".".join(p) for p, _ in _override_leaves(spec.overrides, TrainSpec, ())}
        lines = []
        for loc, why in _problems(e):
            hit = next((o for o in overridden if loc == o or loc.startswith(o + ".") or o.startswith(loc + ".")), None)
            lines.append(f"  - `overrides.{hit}` ({loc}): {why}" if hit else f"  - {loc} (in `train` {path}): {why}")
        raise SpecError(
            f"`train` ({path}) with `overrides` applied is not a valid TrainSpec; fix the file or the override:\n"
            + "\n".join(lines)
        ) from None
    market = train.placement.label_selector.get(MARKET_LABEL)
    if market is not None:
        raise SpecError(
            f"Got `{MARKET_LABEL}: {market}` in the trial placement.label_selector (from `train` {path} or "
            f"`overrides`); the tuner adds the market label from `market.prefer`/`market.fallback` itself. Replace "
            "it with `overrides: {placement: {label_selector: {...}}}` without the market label."
        )
    if spec.market.prefer == "spot" and not train.placement.allow_spot:
        raise SpecError(
            "Got market.prefer spot for `market.prefer`, but the trial TrainSpec has placement.allow_spot false; "
            "set `overrides: {placement: {allow_spot: true}}` or `market: {prefer: on-demand}`."
        )
    return train


def trial_train_spec(base: TrainSpec, config: dict[str, Any], name: str) -> TrainSpec:
    """`base` with each dotted path of a trial's `config` set, named `name`.

    Raises:
        SpecError: a path is unknown or TrainSpec rejects a value; the message names the path.
    """
    train, problems = _trial(base, config, name)
    if train is None:
        raise SpecError(f"Trial {name}: TrainSpec rejects config {_plain(config)!r}:\n" + "\n".join(
            f"  - `search_space.{path}`: {why}" for path, why in problems))
    return train


def _trial(base: TrainSpec, config: dict[str, Any], name: str) -> tuple[TrainSpec | None, list[tuple[str, str]]]:
    """The trial's TrainSpec, or None and (search-space path, why) for each problem."""
    unknown = [(p, why) for p in config if (why := _path_problem(p))]
    if unknown:
        return None, unknown
    data = base.model_dump(mode="json")
    for path, value in config.items():
        _set(data, path, _plain(value))
    data["name"] = name
    try:
        return TrainSpec.model_validate(data), []
    except ValidationError as e:
        out = []
        for loc, why in _problems(e):
            hit = next((p for p in config if loc == p or loc.startswith(p + ".") or p.startswith(loc + ".")), None)
            # A cross-field check (batch arithmetic) may name another field than the one searched.
            out.append((hit, why) if hit == loc else (hit or loc, f"{loc}: {why}"))
        return None, out


def check_space(spec: TuneSpec, base: TrainSpec) -> None:
    """Validate the TrainSpec that each range's ends and each choice give (one path at a time).

    Randint ranges of fewer than 256 values are checked value by value.

    Raises:
        SpecError: one message naming every `search_space.<path>` that cannot be sampled and why.
    """
    problems = []
    for path, domain in spec.search_space.items():
        why = _path_problem(path)
        if why:
            problems.append(f"  - `search_space.{path}`: {why}")
            continue
        bad, good = [], []
        for value in domain.values_to_check():
            train, why = _trial(base, {path: value}, f"{spec.name}-check")
            if train is None:
                bad.append((value, "; ".join(w for _, w in why)))
            else:
                good.append(value)
        if bad:
            value, reason = bad[0]
            more = f" ({len(bad)} of {len(bad) + len(good)} values checked fail)" if len(bad) > 1 else ""
            hint = f"; values that work include {good[:5]}" if good and domain.kind == "randint" else ""
            problems.append(
                f"  - `search_space.{path}` ({domain.kind}): value {value!r} gives an invalid TrainSpec: "
                f"{reason}{more}{hint}. Narrow the range or use `choice` with valid values."
            )
    if problems:
        raise SpecError(f"Tune spec {spec.name}: the search space cannot be sampled:\n" + "\n".join(problems))


def param_space(spec: TuneSpec) -> dict[str, Any]:
    """Tuner's param_space: a Ray Tune domain per dotted path (flat keys; Tune keeps them as they are)."""
    return {path: domain.to_tune() for path, domain in spec.search_space.items()}
