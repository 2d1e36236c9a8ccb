"""Export under a residency policy: the exported version inherits the source's classification (a
spec may only keep or raise it), and everything export writes, scratch included, stays inside the
classification's storage prefixes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import uae_test_policy
from export_artifacts import digits_artifact
from mlplatform import registry, residency
from mlplatform._internal import metadata
from mlplatform.errors import ResidencyError, SpecError
from mlplatform.export import ExportSpec, _pipeline, export_model, make_spec

FAST = ExportSpec(quantize="none", benchmark={"enabled": False})


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """(base dir, registry root under the restricted prefix holding digits@1 classified 'internal'
    and restricted@1 classified 'uae-restricted'), with the cluster's policy in force for the module."""
    base = tmp_path_factory.mktemp("export-residency")
    policy = uae_test_policy(base / "uae")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(metadata.URL_ENV, raising=False)
        mp.delenv(residency.CLUSTER_ENV, raising=False)
        mp.setenv(residency.POLICY_ENV, residency.encode(policy))
        root = base / "uae" / "registry"
        art = digits_artifact(base / "digits")
        registry.register(art, "digits", root=root, lineage={"training_regions": ["me-central-1"]})
        registry.register(art, "restricted", root=root, lineage={"classification": "uae-restricted"})
        yield base, root


@pytest.fixture
def no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the export ran before its residency was checked")

    monkeypatch.setattr(_pipeline, "export_artifact", refuse)


def _tree(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


def test_export_raises_then_inherits_and_its_scratch_stays_inside(place, monkeypatch):
    base, root = place
    seen = []
    real = _pipeline._export_and_register

    def spy(parent, spec, work, *args):
        seen.append((work, tempfile.gettempdir()))
        return real(parent, spec, work, *args)

    monkeypatch.setattr(_pipeline, "_export_and_register", spy)
    raised = export_model("digits@1", FAST.model_copy(update={"classification": "uae-restricted"}), root=root)
    v2 = registry.resolve(raised.version_ref, root=root)
    assert (v2.version, v2.lineage.classification, v2.lineage.training_regions) == (2, "uae-restricted", ["me-central-1"])
    # The decrypted source copy, the ONNX files and the libraries' own temporary files.
    work, libraries_tmp = seen[0]
    assert work.parent == base / "uae" and libraries_tmp == str(work)
    assert not work.exists() and tempfile.gettempdir() != str(work)

    inherited = export_model("digits@2", FAST, root=root)  # no classification: the source's
    assert registry.resolve(inherited.version_ref, root=root).lineage.classification == "uae-restricted"


def test_lowering_is_refused_before_any_work(place, no_work):
    _, root = place
    before = _tree(root)
    with pytest.raises(ResidencyError) as e:
        export_model("restricted@1", make_spec(quantize="none", classification="internal"), root=root)
    assert str(e.value).startswith("Got 'internal' for `classification`; the source version restricted@1 is "
                                   "classified 'uae-restricted'")
    with pytest.raises(ResidencyError, match="knows internal, public, uae-restricted"):
        export_model("restricted@1", FAST.model_copy(update={"classification": "secret"}), root=root)
    assert _tree(root) == before


def test_a_registry_outside_the_prefixes_is_refused_before_any_work(place, no_work, tmp_path):
    base, root = place
    # A restricted version in a registry from before the policy: exporting it now must not write there.
    elsewhere = tmp_path / "registry"
    shutil.copytree(root, elsewhere)
    before = _tree(elsewhere)
    with pytest.raises(ResidencyError, match=rf"Got '{elsewhere}' for `root`: 'uae-restricted' data under residency "
                                             rf"policy 'test-uae' may only be stored under {base / 'uae'}/"):
        export_model("restricted@1", FAST, root=elsewhere)
    assert _tree(elsewhere) == before


def test_classification_override_is_validated_as_part_of_the_spec():
    assert make_spec(classification="uae-restricted").classification == "uae-restricted"
    assert ExportSpec().classification is None
    with pytest.raises(SpecError, match="classification"):
        make_spec(classification=5)
