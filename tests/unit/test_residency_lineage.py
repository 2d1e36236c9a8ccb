"""Classification follows lineage: the order of classifications, never lowering, and confinement."""

from __future__ import annotations

import pytest

from conftest import REPO
from mlplatform import residency
from mlplatform._internal import storage
from mlplatform.errors import ResidencyError


@pytest.fixture
def policy():
    return residency.load(REPO / "cluster_configs/residency/uae.yaml")


def test_order_is_by_the_regions_a_classification_allows(policy):
    order = ["uae-restricted", "internal", "public"]  # most restrictive first
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            assert policy.at_least_as_restrictive(a, b) == (i <= j), (a, b)
    assert policy.at_least_as_restrictive(None, "internal")  # None is the default, internal


def test_equal_regions_compare_equal_and_zones_narrow():
    policy = residency.ResidencyPolicy.model_validate({
        "name": "p", "default_classification": "a",
        "classifications": {
            "a": {"regions": ["r1"]}, "b": {"regions": ["r1"]},
            "z": {"regions": ["r1"], "zones": ["r1a"]},
        },
    })
    assert policy.at_least_as_restrictive("a", "b") and policy.at_least_as_restrictive("b", "a")
    assert policy.at_least_as_restrictive("z", "a") and not policy.at_least_as_restrictive("a", "z")


def test_inherit_keeps_or_raises_never_lowers(policy):
    source = "the source version m@1"
    assert residency.inherit(policy, "internal", None, field="classification", source=source) == "internal"
    assert residency.inherit(policy, None, None, field="classification", source=source) == "internal"  # the default
    assert residency.inherit(policy, "internal", "uae-restricted", field="classification", source=source) == "uae-restricted"
    with pytest.raises(ResidencyError) as e:
        residency.inherit(policy, "uae-restricted", "public", field="classification", source=source)
    text = str(e.value)
    assert text.startswith("Got 'public' for `classification`; the source version m@1 is classified 'uae-restricted'")
    assert "less restrictive under residency policy 'uae'" in text
    assert "omit `classification` or pass one of uae-restricted." in text
    with pytest.raises(ResidencyError, match="pass one of uae-restricted, internal"):
        residency.inherit(policy, None, "public", field="classification", source=source)  # below the default


def test_inherit_names_the_known_classifications_for_an_unknown_one(policy):
    with pytest.raises(ResidencyError, match=r"Got 'secret' for `--classification`; .* knows internal, public, uae-restricted"):
        residency.inherit(policy, "internal", "secret", field="--classification", source="x")


def test_without_a_policy_a_classification_is_kept_exactly():
    assert residency.inherit(None, None, None, field="c", source="x") is None
    assert residency.inherit(None, None, "anything", field="c", source="x") == "anything"
    assert residency.inherit(None, "uae-restricted", None, field="c", source="x") == "uae-restricted"
    assert residency.inherit(None, "uae-restricted", "uae-restricted", field="c", source="x") == "uae-restricted"
    with pytest.raises(ResidencyError, match=r"Got 'top-secret' for `c`; x is classified 'uae-restricted', and with no "
                                             r"residency policy"):
        residency.inherit(None, "uae-restricted", "top-secret", field="c", source="x")


def test_confined_writes_only_under_the_classifications_prefixes(policy, tmp_path):
    with residency.confined(policy, "uae-restricted"):
        storage.check_write("/tmp/mlplatform/registry/m")
        storage.check_write("s3://mlplatform-uae/registry/m")
        with pytest.raises(ResidencyError, match="'uae-restricted' data under residency policy 'uae' may only be stored "
                                                 "under /tmp/mlplatform/, s3://mlplatform-uae/"):
            storage.check_write("/tmp/mlplatform-internal/registry/m")
    with residency.confined(policy, "public"):  # no prefixes: anywhere
        storage.check_write(tmp_path / "x")
    with residency.confined(None, "uae-restricted"):  # no policy: nothing to confine to
        storage.check_write(tmp_path / "x")
    with pytest.raises(ResidencyError, match="Got 'secret' for `classification`"):
        residency.confined(policy, "secret")
