"""The residency policy: loading and validation, compiling to selectors, storage prefixes, preflight."""

from __future__ import annotations

import pytest

from conftest import REPO
from mlplatform import config, residency
from mlplatform.cluster import ClusterSpec
from mlplatform.errors import PreflightError, ResidencyError, SpecError
from mlplatform.train import TrainSpec
from mlplatform.train.preflight import check_capacity, placement_selector

REGION = "ray.io/availability-region"
THREE_REGION = REPO / "cluster_configs/local/three-region.yaml"


@pytest.fixture(scope="module")
def policy() -> residency.ResidencyPolicy:
    spec = config.load(THREE_REGION, ClusterSpec)
    return residency.for_cluster_spec(spec, THREE_REGION)


def test_the_shipped_cluster_names_the_uae_policy(policy):
    assert policy.name == "uae" and policy.default_classification == "internal"
    assert set(policy.classifications) == {"uae-restricted", "internal", "public"}


def write_policy(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    return path


GOOD = """name: t
default_classification: a
classifications:
  a: {regions: [me-central-1], storage_prefixes: [/data/a]}
  b: {regions: ["*"], storage_prefixes: [/data/b]}
"""


@pytest.mark.parametrize("body, match", [
    (GOOD.replace("default_classification: a", "default_classification: c"), "default_classification 'c' is not one"),
    (GOOD.replace("/data/b", "/data/a/sub"), "storage prefixes overlap: '/data/a/' .a. and '/data/a/sub/' .b."),
    (GOOD.replace('["*"]', '["*", eu-central-1]'), "allows every region; list it alone"),
    (GOOD.replace("regions: [me-central-1]", "regions: []"), "regions"),
    (GOOD.replace("  a:", "  A_b:").replace("classification: a", "classification: A_b"), "lowercase"),
    (GOOD + "extra: 1\n", "unknown field"),
])
def test_bad_policies_are_refused_naming_the_field(tmp_path, body, match):
    with pytest.raises(SpecError, match=match):
        residency.load(write_policy(tmp_path, body))


def test_a_region_no_node_group_has_is_refused(tmp_path):
    path = write_policy(tmp_path, GOOD.replace("me-central-1", "me-centrall-1"))
    with pytest.raises(ResidencyError, match=r"'a' allows region\(s\) me-centrall-1, which no node group.*Fix the region"):
        residency.load(path, {"me-central-1", "eu-central-1"})


def test_restricted_work_compiles_to_its_regions_and_narrows_the_specs_own(policy):
    assert policy.place("uae-restricted", {}, "f") == {REGION: "me-central-1"}
    assert policy.place("uae-restricted", {"ray.io/node-group": "cpu"}, "f") == {
        "ray.io/node-group": "cpu", REGION: "me-central-1"}
    assert policy.place("uae-restricted", {REGION: "in(me-central-1,eu-central-1)"}, "f") == {REGION: "me-central-1"}
    assert policy.place(None, {}, "f") == {REGION: "in(eu-central-1,me-central-1)"}  # the default: internal
    assert policy.place("public", {"ray.io/node-group": "eu"}, "f") == {"ray.io/node-group": "eu"}


@pytest.mark.parametrize("own", [{REGION: "eu-central-1"}, {REGION: "!me-central-1"}, {REGION: "in(eu-central-1,us-east-1)"}])
def test_a_selector_contradicting_the_policy_is_an_error_not_an_override(policy, own):
    with pytest.raises(ResidencyError, match=r"for `placement.label_selector`; it contradicts residency policy 'uae'.*"
                                             r"'uae-restricted' work may only run in regions me-central-1"):
        policy.place("uae-restricted", own, "placement.label_selector")


def test_unknown_classification_lists_the_known_ones(policy):
    with pytest.raises(ResidencyError, match="Got 'secret' for `classification`.*knows internal, public, uae-restricted"):
        policy.place("secret", {}, "f")


def test_storage_prefixes_match_whole_path_components(policy):
    assert policy.allows_storage("uae-restricted", "/tmp/mlplatform/runs")
    assert policy.allows_storage("uae-restricted", "s3://mlplatform-uae/runs/x")
    assert not policy.allows_storage("uae-restricted", "/tmp/mlplatform-internal/runs")
    assert not policy.allows_storage("uae-restricted", "/tmp/elsewhere")
    assert policy.allows_storage("public", "/anywhere/at/all")
    with pytest.raises(ResidencyError, match=r"Got '/tmp/x' for `storage_path`; 'uae-restricted' data may only be stored"):
        policy.check_storage("uae-restricted", "/tmp/x", "storage_path")


def digits(**changes) -> TrainSpec:
    spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
    return spec.model_copy(update=changes)


def test_a_classified_spec_needs_a_cluster_with_a_policy():
    assert digits().classification == "uae-restricted"
    with pytest.raises(ResidencyError, match="this cluster has no residency policy"):
        placement_selector(digits(), None)
    assert placement_selector(digits(classification=None), None) == digits().placement.selector()


def _three_region_nodes():
    from mlplatform.cluster.inventory import from_ray_nodes

    def node(i, group, region, cpus, market="on-demand"):
        labels = {"ray.io/node-group": group, "ray.io/market-type": market, REGION: region}
        return {"NodeID": f"n{i}", "NodeName": f"10.0.0.{i}", "NodeManagerAddress": f"10.0.0.{i}",
                "Labels": labels, "Resources": {"CPU": cpus}, "Alive": True}

    return from_ray_nodes([node(0, "head", "me-central-1", 1), node(1, "cpu", "me-central-1", 4),
                           node(2, "gpu", "me-central-1", 2, "spot"), node(3, "eu", "eu-central-1", 2)])


def test_restricted_work_aimed_at_the_eu_group_is_refused_in_residency_terms(policy):
    spec = digits(placement=digits().placement.model_copy(update={"label_selector": {"ray.io/node-group": "eu"}}))
    selector = placement_selector(spec, policy)
    assert selector[REGION] == "me-central-1"
    with pytest.raises(ResidencyError) as info:
        check_capacity(spec, _three_region_nodes(), selector, policy)
    message = str(info.value)
    for part in ("Classification 'uae-restricted' may only run in regions me-central-1", "no node matches",
                 "eu (eu-central-1)", "inside the allowed regions: cpu, gpu, head", "Nothing was started"):
        assert part in message, (part, message)


def test_work_too_big_for_any_node_is_refused_with_the_residency_context(policy):
    # No node anywhere holds it: a capacity error (not the policy's doing), which still says where
    # the classification may run and what is there.
    spec = digits(resources_per_worker={"CPU": 64})
    with pytest.raises(PreflightError, match=r"at most 0 workers of \{'CPU': 64.*Classification 'uae-restricted' may only "
                                             r"run in regions me-central-1.*eu \(eu-central-1\).*inside the allowed "
                                             r"regions: cpu, gpu, head"):
        check_capacity(spec, _three_region_nodes(), placement_selector(spec, policy), policy)
    check_capacity(digits(), _three_region_nodes(), placement_selector(digits(), policy), policy)


def test_serve_replicas_and_the_canary_gate_are_confined_too(policy):
    from mlplatform.serve import ServeSpec
    from mlplatform.serve._app import _selectors

    base = {"name": "digits", "model": "digits@production", "registry_root": "/tmp/r"}
    spec = ServeSpec(**base, classification="uae-restricted", primary={"label_selector": {"ray.io/node-group": "cpu"}})
    selectors = _selectors(spec, policy)
    assert selectors["primary"] == {"ray.io/node-group": "cpu", REGION: "me-central-1"}
    assert selectors["ingress"] == selectors["gate"] == {REGION: "me-central-1"}
    eu = ServeSpec(**base, classification="uae-restricted", ingress={"label_selector": {REGION: "eu-central-1"}})
    with pytest.raises(ResidencyError, match="for `ingress.label_selector`; it contradicts residency policy 'uae'"):
        _selectors(eu, policy)
    with pytest.raises(ResidencyError, match="this cluster has no residency policy"):
        _selectors(spec, None)
