"""Residency in the registry: classification follows lineage from the training artifact, is never
lowered, confines where a version is stored, and every registration and alias move is audited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import uae_test_policy
from mlplatform import registry, residency
from mlplatform._internal import metadata
from mlplatform.errors import ResidencyError
from mlplatform.registry._records import manifest_from_json
from mlplatform.residency import audit
from mlplatform.train import artifact

CLUSTER = "audited"


@pytest.fixture(autouse=True)
def embedded_store(monkeypatch):
    monkeypatch.delenv(metadata.URL_ENV, raising=False)
    monkeypatch.delenv(residency.POLICY_ENV, raising=False)
    monkeypatch.delenv(residency.CLUSTER_ENV, raising=False)


@pytest.fixture
def policy(tmp_path, monkeypatch) -> residency.ResidencyPolicy:
    """The cluster's policy (as `cluster up` hands it to every process): restricted data only under tmp/uae."""
    policy = uae_test_policy(tmp_path / "uae")
    monkeypatch.setenv(residency.POLICY_ENV, residency.encode(policy))
    return policy


@pytest.fixture
def trail(tmp_path, monkeypatch) -> Path:
    """This process works for cluster CLUSTER, whose audit trail lives under a private home."""
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(residency.CLUSTER_ENV, CLUSTER)
    return audit.default_path(CLUSTER)


def trained(tmp_path: Path, spec_classification: str | None = None, where: dict | None = None) -> Path:
    """An artifact as training writes it (artifact.write_artifact), with what the trainer knows of residency."""
    import pyarrow as pa

    weights = tmp_path / "weights.safetensors"
    tmp_path.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"w" * 300)
    meta = {"model_ref": "builtin:digits_mlp", "spec": {"classification": spec_classification},
            "metrics": {"val_accuracy": 0.9}}
    target = tmp_path / "run" / "artifact"
    return Path(artifact.write_artifact(str(target), str(weights), meta, pa.table({"x": [1, 2]}), residency=where))


WHERE = {"classification": "uae-restricted", "regions": ["me-central-1"], "node_ids": ["b" * 56, "a" * 56]}


def test_training_records_classification_and_where_it_ran_and_the_registry_keeps_them(tmp_path, policy):
    art = trained(tmp_path, spec_classification=None, where=WHERE)
    meta = json.loads((art / "metadata.json").read_text())
    assert (meta["classification"], meta["training_regions"], meta["training_node_ids"]) == (
        "uae-restricted", ["me-central-1"], ["a" * 56, "b" * 56])
    root = tmp_path / "uae" / "registry"
    v = registry.register(art, "m", root=root)
    assert v.lineage.classification == "uae-restricted"
    assert v.lineage.training_regions == ["me-central-1"] and v.lineage.training_node_ids == ["a" * 56, "b" * 56]
    assert v.uri == str(root / "m" / "versions" / "1" / "files")  # where it is stored
    assert registry.show("m@1", root=root).lineage == v.lineage  # and read back from its manifest


def test_without_what_the_trainer_knows_the_spec_classification_is_recorded(tmp_path):
    meta = json.loads((trained(tmp_path, spec_classification="internal") / "metadata.json").read_text())
    assert (meta["classification"], meta["training_regions"], meta["training_node_ids"]) == ("internal", [], [])


def test_an_unclassified_artifact_gets_the_policy_default_or_none_without_a_policy(tmp_path, monkeypatch, policy):
    art = trained(tmp_path)
    assert registry.register(art, "m", root=tmp_path / "reg").lineage.classification == "internal"
    monkeypatch.delenv(residency.POLICY_ENV)
    assert registry.register(art, "m", root=tmp_path / "reg").lineage.classification is None


def test_versions_registered_before_residency_read_fine():
    old = {"name": "m", "version": 1, "registered_at": "t", "registered_by": "u", "files": [], "encryption": None,
           "lineage": {"spec": None, "metrics": {}, "dataset_fingerprint": None, "job_id": None, "storage_region": None,
                       "model_ref": None, "input_signature": None, "source_uri": "/a", "extra": {}}}
    lineage = manifest_from_json(old, "/r/m/versions/1/files").lineage
    assert (lineage.classification, lineage.training_regions, lineage.training_node_ids) == (None, [], [])


def test_registering_lower_than_the_artifact_is_refused_and_nothing_is_written(tmp_path, policy, trail):
    art = trained(tmp_path, where=WHERE)
    root = tmp_path / "uae" / "registry"
    with pytest.raises(ResidencyError) as e:
        registry.register(art, "m", root=root, lineage={"classification": "internal"})
    text = str(e.value)
    assert text.startswith(f"Got 'internal' for `lineage['classification']`; the artifact {art} (its metadata.json) "
                           "is classified 'uae-restricted' (regions me-central-1)")
    assert "never lowered: omit `lineage['classification']` or pass one of uae-restricted." in text
    assert not root.exists()
    [denial] = audit.read(trail, "denial")
    assert denial["what"] == "register" and denial["model"] == "m" and "never lowered" in denial["reason"]


def test_raising_is_allowed_and_unknown_names_the_known_ones(tmp_path, policy):
    art = trained(tmp_path, where={**WHERE, "classification": "internal"})
    root = tmp_path / "uae" / "registry"
    v = registry.register(art, "m", root=root, lineage={"classification": "uae-restricted"})
    assert v.lineage.classification == "uae-restricted"
    with pytest.raises(ResidencyError, match=r"Got 'secret' for `lineage\['classification'\]`; residency policy "
                                             r"'test-uae' knows internal, public, uae-restricted"):
        registry.register(art, "m", root=root, lineage={"classification": "secret"})


def test_without_a_policy_a_classification_cannot_change(tmp_path):
    art = trained(tmp_path, where=WHERE)
    with pytest.raises(ResidencyError, match="with no residency policy"):
        registry.register(art, "m", root=tmp_path / "reg", lineage={"classification": "public"})
    assert not (tmp_path / "reg").exists()
    assert registry.register(art, "m", root=tmp_path / "reg").lineage.classification == "uae-restricted"


def test_a_root_outside_the_classifications_prefixes_is_refused_before_a_byte(tmp_path, policy, trail):
    art = trained(tmp_path, where=WHERE)
    root = tmp_path / "uae-elsewhere" / "registry"  # shares a name prefix, not a path component
    with pytest.raises(ResidencyError) as e:
        registry.register(art, "m", root=root)
    assert str(e.value).startswith(
        f"Got '{root}' for `root`: 'uae-restricted' data under residency policy 'test-uae' may only be stored "
        f"under {tmp_path / 'uae'}/")
    assert not (tmp_path / "uae-elsewhere").exists()  # no probe, no database, no staging
    # An ambient confinement (export's, a restricted job's driver) applies to the store's own writes too.
    with residency.confined(policy, "uae-restricted"):
        with pytest.raises(ResidencyError, match="for `root`"):
            registry.check_writable(root, "m")  # what export asks before its work
        with pytest.raises(ResidencyError):
            registry.register(trained(tmp_path / "pub", where={"classification": "public"}), "p", root=root)
    assert not (tmp_path / "uae-elsewhere").exists()


def test_registration_and_alias_moves_are_audited(tmp_path, policy, trail):
    root = tmp_path / "uae" / "registry"
    v1 = registry.register(trained(tmp_path, where=WHERE), "m", root=root)
    v2 = registry.register(trained(tmp_path / "b", where=WHERE), "m", root=root)
    registry.set_alias("m", "canary", v2.version, root=root, reason="try it")
    registry.set_alias("m", "production", v1.version, root=root)
    registry.promote("m", root=root)
    registry.rollback("m", "production", root=root)
    assert audit.verify(trail).ok
    artifacts = list(audit.read(trail, "artifact"))
    assert [(r["model"], r["version"], r["classification"], r["uri"]) for r in artifacts] == [
        ("m", 1, "uae-restricted", v1.uri), ("m", 2, "uae-restricted", v2.uri)]
    assert artifacts[0]["training_regions"] == ["me-central-1"] and artifacts[0]["registry"] == str(root)
    moves = [(r["alias"], r["action"], r["from_version"], r["to_version"]) for r in audit.read(trail, "alias")]
    assert moves == [("canary", "set", None, 2), ("production", "set", None, 1), ("production", "promote", 1, 2),
                     ("production", "rollback", 2, 1)]
    assert next(audit.read(trail, "alias"))["reason"] == "try it"


def test_fetch_goes_through_the_storage_layer(tmp_path, policy):
    root = tmp_path / "uae" / "registry"
    registry.register(trained(tmp_path, where=WHERE), "m", root=root)
    with residency.confined(policy, "uae-restricted"):
        with pytest.raises(ResidencyError):
            registry.fetch("m@1", tmp_path / "eu" / "copy", root=root)
        registry.fetch("m@1", tmp_path / "uae" / "copy", root=root)
    assert not (tmp_path / "eu").exists()
    assert (tmp_path / "uae" / "copy" / "model.safetensors").read_bytes() == b"w" * 300
