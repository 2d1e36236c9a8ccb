"""Where work may run: Ray label selectors, which nodes satisfy them, and how much fits there.

Ray leaves a task, actor, Train worker or Serve replica whose selector no node satisfies
pending forever, without an error; train and serve preflights therefore check here first.
A selector is Ray's own form, a mapping {label: condition} whose conditions are `v`, `!v`,
`in(a,b)` or `!in(a,b)`, all of which must hold. `LabelSelector` parses that form so that
selectors can be matched and intersected: a residency policy narrows a job's selector with
`{region: in(allowed...)}` and refuses the job when nothing is left.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Condition:
    """One label's condition: its value is (or, negated, is not) one of `values`."""

    values: frozenset[str]
    negated: bool = False

    @classmethod
    def parse(cls, text: str) -> Condition:
        """`v`, `!v`, `in(a,b)` or `!in(a,b)`, as Ray writes them (spaces after commas allowed)."""
        negated = text.startswith("!")
        body = text[1:] if negated else text
        if body.startswith("in(") and body.endswith(")"):
            values = frozenset(v.strip() for v in body[3:-1].split(","))
        else:
            values = frozenset({body})
        return cls(values, negated)

    def holds(self, value: str | None) -> bool:
        """Whether a node whose label has `value` (None: the node lacks the label) satisfies it."""
        return (value in self.values) != self.negated

    def __and__(self, other: Condition) -> Condition | None:
        """The condition both hold on; None when no value can satisfy both (or a negation ANDs a set)."""
        if self.negated and other.negated:
            return Condition(self.values | other.values, True)
        if not self.negated and not other.negated:
            values = self.values & other.values
        else:
            want, exclude = (other, self) if self.negated else (self, other)
            values = want.values - exclude.values
        return Condition(values) if values else None

    def __str__(self) -> str:
        body = next(iter(self.values)) if len(self.values) == 1 else f"in({','.join(sorted(self.values))})"
        return f"!{body}" if self.negated else body


class Unsatisfiable(ValueError):
    """Two selectors ask for disjoint values of one label: no node can satisfy both."""


@dataclass(frozen=True)
class LabelSelector:
    """A parsed Ray label selector; `to_ray()` gives the mapping Ray's APIs take."""

    conditions: Mapping[str, Condition]

    @classmethod
    def of(cls, selector: Mapping[str, str] | LabelSelector | None) -> LabelSelector:
        if isinstance(selector, LabelSelector):
            return selector
        return cls({key: Condition.parse(text) for key, text in (selector or {}).items()})

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with these labels satisfies every condition."""
        return all(cond.holds(labels.get(key)) for key, cond in self.conditions.items())

    def intersect(self, other: Mapping[str, str] | LabelSelector) -> LabelSelector:
        """The selector nodes must satisfy to meet both (e.g. a job's and a residency policy's).

        Raises:
            Unsatisfiable: both constrain one label to values that exclude each other.
        """
        out = dict(self.conditions)
        for key, cond in LabelSelector.of(other).conditions.items():
            both = out[key] & cond if key in out else cond
            if both is None:
                raise Unsatisfiable(f"`{key}`: {out[key]} and {cond} exclude each other")
            out[key] = both
        return LabelSelector(out)

    def to_ray(self) -> dict[str, str]:
        return {key: str(cond) for key, cond in self.conditions.items()}

    def __bool__(self) -> bool:
        return bool(self.conditions)

    def __str__(self) -> str:
        return str(self.to_ray())


def matches(labels: Mapping[str, str], selector: Mapping[str, str] | LabelSelector | None) -> bool:
    """Whether a node with `labels` satisfies `selector` (empty or None: every node does)."""
    return LabelSelector.of(selector).matches(labels)


class NodeLike(Protocol):
    """What the capacity check reads of a node (mlplatform.cluster.Node has it)."""

    labels: Mapping[str, str]
    resources: Mapping[str, float]
    alive: bool


def slots(resources: Mapping[str, float], demand: Mapping[str, float]) -> float:
    """How many units of `demand` fit in `resources` at once (math.inf when it asks for nothing)."""
    counts = [math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return min(counts) if counts else math.inf


@dataclass(frozen=True)
class Capacity:
    """The alive nodes a selector matches and how many units of a demand they hold in all."""

    matching: tuple[NodeLike, ...]
    total: float  # sum of slots() over `matching`; math.inf for a demand of nothing
    largest: float  # most units one matching node holds (0 when none matches)


def capacity(
    nodes: Iterable[NodeLike], selector: Mapping[str, str] | LabelSelector | None, demand: Mapping[str, float]
) -> Capacity:
    """Capacity of the cluster for workers/replicas each needing `demand`, where `selector` allows.

    Only total resources count (what could ever run there): work pending behind other work
    will start, work no node can hold never will.
    """
    selector = LabelSelector.of(selector)
    matching = tuple(n for n in nodes if n.alive and selector.matches(n.labels))
    per_node = [slots(n.resources, demand) for n in matching]
    return Capacity(matching, sum(per_node), max(per_node, default=0))


__all__ = ["Capacity", "Condition", "LabelSelector", "NodeLike", "Unsatisfiable", "capacity", "matches", "slots"]
