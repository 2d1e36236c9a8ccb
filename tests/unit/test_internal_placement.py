"""mlplatform._internal.placement: Ray label selectors, node matching, capacity; both preflights use it."""

import math
from dataclasses import dataclass, field

import pytest

from mlplatform._internal import placement
from mlplatform._internal.placement import Condition, LabelSelector, Unsatisfiable

REGION, GROUP, MARKET = "ray.io/availability-region", "ray.io/node-group", "ray.io/market-type"
UAE = {REGION: "me-central-1", GROUP: "cpu", MARKET: "on-demand"}


@pytest.mark.parametrize("selector, hit", [
    ({GROUP: "cpu"}, True),
    ({GROUP: "gpu"}, False),
    ({MARKET: "!spot"}, True),
    ({MARKET: "!on-demand"}, False),
    ({REGION: "in(me-central-1, me-west-1)"}, True),
    ({REGION: "in(eu-west-1,us-east-1)"}, False),
    ({REGION: "!in(eu-west-1, us-east-1)"}, True),
    ({REGION: "!in(me-central-1)"}, False),
    ({GROUP: "cpu", MARKET: "spot"}, False),  # every condition must hold
    ({"mlplatform.io/tier": "!gold"}, True),  # a node without the label is not gold
    ({"mlplatform.io/tier": "gold"}, False),
    ({}, True),
])
def test_node_matching(selector, hit):
    assert placement.matches(UAE, selector) is hit
    assert LabelSelector.of(selector).matches(UAE) is hit


def test_conditions_round_trip_to_what_ray_takes():
    ray_form = {GROUP: "cpu", MARKET: "!spot", REGION: "in(me-central-1,me-west-1)", "x": "!in(a,b)"}
    assert LabelSelector.of(ray_form).to_ray() == ray_form
    assert Condition.parse("in(b, a)") == Condition(frozenset({"a", "b"}))


def test_residency_narrows_a_job_selector_to_allowed_regions():
    allowed = {REGION: "in(me-central-1,me-west-1)"}
    job = LabelSelector.of({GROUP: "cpu"}).intersect(allowed)
    assert job.to_ray() == {GROUP: "cpu", REGION: "in(me-central-1,me-west-1)"}
    assert LabelSelector.of({REGION: "in(me-west-1,eu-west-1)"}).intersect(allowed).to_ray() == {REGION: "me-west-1"}
    assert LabelSelector.of({REGION: "!me-west-1"}).intersect(allowed).to_ray() == {REGION: "me-central-1"}
    assert LabelSelector.of({REGION: "!a"}).intersect({REGION: "!b"}).to_ray() == {REGION: "!in(a,b)"}
    with pytest.raises(Unsatisfiable, match="`ray.io/availability-region`: eu-west-1 and in\\(me-central-1,me-west-1\\)"):
        LabelSelector.of({REGION: "eu-west-1"}).intersect(allowed)


def test_slots_arithmetic():
    assert placement.slots({"CPU": 4, "GPU": 1}, {"CPU": 1}) == 4
    assert placement.slots({"CPU": 4, "GPU": 1}, {"CPU": 1, "GPU": 1}) == 1  # the scarcest resource decides
    assert placement.slots({"CPU": 0.3}, {"CPU": 0.1}) == 3  # no float rounding loss
    assert placement.slots({"CPU": 1}, {"CPU": 0.25}) == 4
    assert placement.slots({"CPU": 4}, {"GPU": 1}) == 0  # a resource the node lacks
    assert placement.slots({"CPU": 4}, {"CPU": 0, "GPU": 0}) == math.inf  # asks for nothing


@dataclass(frozen=True)
class FakeNode:
    name: str
    labels: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    alive: bool = True


def test_capacity_counts_only_alive_matching_nodes():
    nodes = [
        FakeNode("a", {GROUP: "cpu"}, {"CPU": 4}),
        FakeNode("b", {GROUP: "cpu"}, {"CPU": 3}),
        FakeNode("dead", {GROUP: "cpu"}, {"CPU": 8}, alive=False),
        FakeNode("gpu", {GROUP: "gpu"}, {"CPU": 8, "GPU": 2}),
    ]
    room = placement.capacity(nodes, {GROUP: "cpu"}, {"CPU": 2})
    assert [n.name for n in room.matching] == ["a", "b"]
    assert room.total == 3 and room.largest == 2  # 2 on a, 1 on b: workers do not span nodes
    nothing = placement.capacity(nodes, {GROUP: "tpu"}, {"CPU": 1})
    assert nothing.matching == () and nothing.total == 0 and nothing.largest == 0
    assert placement.capacity(nodes, None, {"GPU": 1}).total == 2


# ---- both preflights call the one implementation


def _ray_nodes():
    def node(i, group, cpus, gpus=0, alive=True):
        return {"NodeID": f"n{i}", "NodeName": f"10.0.0.{i}", "NodeManagerAddress": f"10.0.0.{i}",
                "Labels": {GROUP: group}, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})},
                "Alive": alive}

    return [node(0, "head", 1), node(1, "cpu", 2), node(2, "gpu", 4, gpus=1, alive=False)]


def test_serve_preflight_refuses_a_deployment_no_live_node_can_hold(monkeypatch):
    import ray

    from mlplatform.errors import PlacementError
    from mlplatform.serve import ServeSpec
    from mlplatform.serve._app import _preflight, _selectors

    def preflight(spec):
        _preflight(spec, _selectors(spec, None))

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", _ray_nodes)
    base = {"name": "digits", "model": "digits@production", "registry_root": "/tmp/r"}
    preflight(ServeSpec(**base, primary={"num_cpus": 2}))  # fits on the cpu node
    with pytest.raises(PlacementError, match=r"No live node satisfies `primary.label_selector` .* with 3 CPU"):
        preflight(ServeSpec(**base, primary={"num_cpus": 3}))
    with pytest.raises(PlacementError, match=r"`primary.label_selector` \{'ray.io/node-group': 'gpu'\}.*1 GPU"):
        preflight(ServeSpec(**base, primary={"label_selector": {GROUP: "gpu"}, "num_gpus": 1}))
