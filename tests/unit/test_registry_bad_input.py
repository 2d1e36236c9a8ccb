"""Registry bad input: one clear error each, and the registry stays exactly as it was."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.errors import (
    AliasNotFound,
    ArtifactError,
    EncryptionKeyError,
    InvalidName,
    ModelNotFound,
    PlatformError,
    RegistryError,
    RegistryNotWritable,
    VersionNotFound,
)
from mlplatform.registry import (
    check_writable,
    diff,
    fetch,
    generate_key,
    list_models,
    promote,
    register,
    rollback,
    set_alias,
    verify,
)
from mlplatform.registry._index import DB_FILE, model_names, read_index
from mlplatform.registry._names import check_name
from mlplatform.registry._store import Store


# Every test runs on the embedded SQLite store and on a live PostgreSQL server.
pytestmark = pytest.mark.usefixtures("metadata_backend")

def make_artifact(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights" * 50)
    (path / "metadata.json").write_text(json.dumps({"metrics": {"accuracy": 0.9}}))
    return path


def snapshot(root: Path) -> dict[str, object]:
    """Every artifact file under the root, and every model's index as the metadata store holds it."""
    files = {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(DB_FILE)  # the database's own pages and journals
    }
    store = Store(root)
    return {**files, "index": {name: read_index(store, name) for name in model_names(store)}}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """Model `m` with versions 1 (plain) and 2 (encrypted), production -> 1."""
    root = tmp_path / "registry"
    register(make_artifact(tmp_path / "a1"), "m", root=root)
    register(make_artifact(tmp_path / "a2"), "m", root=root, encrypt_key=generate_key())
    set_alias("m", "production", 1, root=root)
    return root


def fails(error: type[PlatformError], match: str, call, root: Path) -> PlatformError:
    """`call` raises `error`, the error pickles, and the registry is unchanged and healthy."""
    before = snapshot(root)
    with pytest.raises(error, match=match) as info:
        call()
    assert snapshot(root) == before
    assert verify("m@1", root=root).ok and verify("m@2", root=root).ok
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is type(info.value) and clone.args == info.value.args
    return info.value


def test_alias_that_does_not_exist(registry, tmp_path):
    error = fails(AliasNotFound, "no alias 'canary'", lambda: fetch("m@canary", tmp_path / "o", root=registry), registry)
    assert "production -> 1" in str(error) and "set_alias" in str(error)
    fails(AliasNotFound, "`from_alias`", lambda: promote("m", root=registry), registry)
    fails(AliasNotFound, "no alias 'staging'", lambda: rollback("m", "staging", root=registry), registry)
    fails(AliasNotFound, "no earlier target", lambda: rollback("m", "production", root=registry), registry)
    fails(InvalidName, "both `from_alias` and `to_alias`",
          lambda: promote("m", "production", "production", root=registry), registry)
    assert not (tmp_path / "o").exists()


def test_version_that_does_not_exist(registry, tmp_path):
    error = fails(VersionNotFound, "Got 7 for `ref`", lambda: fetch("m@7", tmp_path / "o", root=registry), registry)
    assert "versions 1-2 (latest 2)" in str(error)
    fails(VersionNotFound, "Got 3 for `version`", lambda: set_alias("m", "canary", 3, root=registry), registry)
    fails(VersionNotFound, "`b`", lambda: diff("m", 1, 9, root=registry), registry)
    fails(InvalidName, "start at 1", lambda: set_alias("m", "canary", 0, root=registry), registry)


def test_model_that_does_not_exist_creates_nothing(registry):
    error = fails(ModelNotFound, "No model 'n'.*registered models: m", lambda: set_alias("n", "prod", 1, root=registry), registry)
    assert "Check `name`" in str(error)
    assert not (registry / "n").exists()


def test_wrong_key(registry, tmp_path):
    fails(EncryptionKeyError, "Wrong key for model 'm' version 2",
          lambda: fetch("m@2", tmp_path / "o", root=registry, key=generate_key()), registry)
    assert not (tmp_path / "o").exists()


def test_unwritable_root_is_refused_before_anything_is_written(tmp_path):
    # A path below a regular file cannot be created, even by root (the tests run as root).
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    artifact = make_artifact(tmp_path / "a")
    with pytest.raises(RegistryNotWritable, match=r"not-a-dir/registry \(`root`\) is not writable.*Nothing was written"):
        register(artifact, "m", root=blocker / "registry")
    assert blocker.read_text() == "" and sorted(p.name for p in tmp_path.iterdir()) == ["a", "not-a-dir"]
    # The same check on its own, for callers that work for minutes before registering (export).
    with pytest.raises(RegistryNotWritable, match=r"not-a-dir/registry \(`root`\) is not writable"):
        check_writable(blocker / "registry")
    check_writable(tmp_path / "fresh")  # creatable: fine, and nothing but the root and its index is left behind
    assert {p.name for p in (tmp_path / "fresh").iterdir()} <= {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"}


def test_unwritable_root_or_model_directory_is_refused(registry, tmp_path):
    # Directory permissions do not stop root (the tests run as root); a regular file where the
    # registry must create a directory stops every user.
    not_a_dir = tmp_path / "registry-file"
    not_a_dir.write_text("")
    match = r"registry-file \(`root`\) is not writable for model 'm'.*Not a directory.*Nothing was written"
    with pytest.raises(RegistryNotWritable, match=match):
        register(make_artifact(tmp_path / "a"), "m", root=not_a_dir)
    assert not_a_dir.read_text() == ""
    # A writable root whose model area is not: refused before any file is copied, and the
    # export's early check (check_writable with the model's name) sees it too.
    shutil.rmtree(registry / "m" / ".staging", ignore_errors=True)
    (registry / "m" / ".staging").write_text("")
    match = r"registry \(`root`\) is not writable for model 'm' \(.*/m/.staging\): .*File exists"
    fails(RegistryNotWritable, match, lambda: register(tmp_path / "a", "m", root=registry), registry)
    fails(RegistryNotWritable, match, lambda: check_writable(registry, "m"), registry)
    check_writable(registry)  # the root itself is writable


@pytest.mark.parametrize(
    "name",
    ["../evil", "/etc/passwd", "a/b", "a\\b", "..", ".", ".hidden", "", "UPPER", "a..b", "x" * 65, "a b", "a@b", "é"],
)
def test_names_that_could_escape_the_root_are_refused(registry, tmp_path, name):
    artifact = tmp_path / "artifact"
    if not artifact.exists():
        make_artifact(artifact)
    before = sorted(p.name for p in tmp_path.iterdir())
    fails(InvalidName, "for `name`", lambda: register(artifact, name, root=registry), registry)
    fails(InvalidName, "`name`", lambda: set_alias(name, "production", 1, root=registry), registry)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list_models(root=registry) == ["m"]


@pytest.mark.parametrize("alias", ["../x", "Prod", "3", "latest", "", "a/b", "-x"])
def test_bad_alias_names_are_refused(registry, alias):
    fails(InvalidName, "`alias`", lambda: set_alias("m", alias, 1, root=registry), registry)


@pytest.mark.parametrize("ref", ["../m@1", "m@../1", "m@-1", "m@Prod", "/m", ""])
def test_bad_references_are_refused(registry, tmp_path, ref):
    fails(InvalidName, "`ref`", lambda: fetch(ref, tmp_path / "o", root=registry), registry)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=70))
def test_every_accepted_name_stays_one_level_inside_the_root(name):
    root = "/registry/root"
    try:
        check_name(name)
    except InvalidName:
        return
    assert os.path.dirname(os.path.normpath(os.path.join(root, name))) == root


def test_artifact_dir_that_does_not_exist(registry, tmp_path):
    fails(ArtifactError, "`artifact_dir`; it does not exist",
          lambda: register(tmp_path / "nope", "m", root=registry), registry)


def test_artifact_dir_that_is_empty_or_a_file(registry, tmp_path):
    (tmp_path / "empty" / "subdir").mkdir(parents=True)  # directories only: still no files
    fails(ArtifactError, "holds no files", lambda: register(tmp_path / "empty", "m", root=registry), registry)
    (tmp_path / "model.bin").write_bytes(b"x")
    fails(ArtifactError, "is a file, not a directory",
          lambda: register(tmp_path / "model.bin", "m", root=registry), registry)


def test_artifact_with_broken_metadata(registry, tmp_path):
    artifact = make_artifact(tmp_path / "bad-meta")
    (artifact / "metadata.json").write_text("{not json")
    fails(ArtifactError, "metadata.json is not valid JSON", lambda: register(artifact, "m", root=registry), registry)
    (artifact / "metadata.json").write_text("[1, 2]")
    fails(ArtifactError, "must be an object", lambda: register(artifact, "m", root=registry), registry)
    (artifact / "metadata.json").write_text(json.dumps({"metrics": [0.9]}))
    fails(ArtifactError, "`metrics`; must be a mapping", lambda: register(artifact, "m", root=registry), registry)


def test_bad_lineage_argument(registry, tmp_path):
    artifact = make_artifact(tmp_path / "a")
    fails(RegistryError, r"unknown key\(s\) \['metric'\] in `lineage`",
          lambda: register(artifact, "m", root=registry, lineage={"metric": {}}), registry)
    fails(RegistryError, "cannot be stored as JSON",
          lambda: register(artifact, "m", root=registry, lineage={"spec": {"f": object()}}), registry)


def test_fetch_into_a_non_empty_directory(registry, tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "old.bin").write_bytes(b"old")
    fails(RegistryError, "`dest_dir`; it exists and is not an empty directory",
          lambda: fetch("m@1", dest, root=registry), registry)
    assert [p.name for p in dest.iterdir()] == ["old.bin"]


def test_missing_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLPLATFORM_REGISTRY_ROOT", raising=False)
    with pytest.raises(RegistryError, match="No registry root given"):
        list_models()
    with pytest.raises(RegistryError, match="does not exist"):
        list_models(root=tmp_path / "nowhere")
    with pytest.raises(ModelNotFound, match="registered models: none"):
        fetch("m", tmp_path / "o", root=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_alias_moves_on_a_registry_that_does_not_exist_create_nothing(tmp_path):
    with pytest.raises(ModelNotFound, match="registered models: none"):
        set_alias("m", "production", 1, root=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
