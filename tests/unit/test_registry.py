"""Model registry: register/fetch round trip, lineage, references, aliases, diff, crash safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlplatform.errors import AliasNotFound
from mlplatform.registry import (
    alias_history,
    diff,
    fetch,
    list_aliases,
    list_models,
    list_versions,
    promote,
    register,
    resolve,
    rollback,
    set_alias,
    show,
    verify,
)
from mlplatform.errors import RegistryError
from mlplatform.registry import _register, _store
from mlplatform.registry._index import read_index
from mlplatform.registry._store import Store


# Every test runs on the embedded SQLite store and on a live PostgreSQL server.
pytestmark = pytest.mark.usefixtures("metadata_backend")

def make_artifact(path: Path, *, accuracy: float = 0.9, lr: float = 0.1, weights: bytes = b"w" * 300) -> Path:
    """An artifact laid out like the training package writes one."""
    (path / "samples").mkdir(parents=True)
    (path / "model.safetensors").write_bytes(weights)
    (path / "samples" / "reference.npz").write_bytes(b"sample-bytes")
    (path / "metadata.json").write_text(json.dumps({
        "spec": {"model": {"name": "mlp", "hidden": 64}, "optim": {"lr": lr}},
        "metrics": {"accuracy": accuracy, "loss": 0.3},
        "dataset_fingerprint": "sha256:feedface",
        "input_signature": {"shape": [None, 64], "dtype": "float32"},
        "model_ref": "builtin:digits-mlp",
        "trained_on": "cpu",
    }))
    return path


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def test_register_then_fetch_round_trips_every_file(tmp_path, root):
    artifact = make_artifact(tmp_path / "artifact")
    version = register(artifact, "digits-mlp", root=root, actor="alice")
    assert (version.name, version.version, version.ref) == ("digits-mlp", 1, "digits-mlp@1")
    assert version.registered_by == "alice" and not version.encrypted
    assert {f.path for f in version.files} == {"metadata.json", "model.safetensors", "samples/reference.npz"}

    fetched = fetch("digits-mlp", tmp_path / "out", root=root)
    assert fetched == version
    assert tree(tmp_path / "out") == tree(artifact)
    assert verify("digits-mlp@1", root=root).ok
    assert not list((tmp_path).glob(".out.partial-*"))


def test_lineage_comes_from_metadata_then_overrides_then_environment(tmp_path, root, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_abc"}}))
    monkeypatch.setenv("RAY_NODE_REGION", "me-central-1")
    artifact = make_artifact(tmp_path / "artifact")
    v1 = register(artifact, "m", root=root)
    assert v1.lineage.metrics == {"accuracy": 0.9, "loss": 0.3}
    assert v1.lineage.spec["optim"]["lr"] == 0.1
    assert v1.lineage.dataset_fingerprint == "sha256:feedface"
    assert v1.lineage.model_ref == "builtin:digits-mlp"
    assert v1.lineage.input_signature == {"shape": [None, 64], "dtype": "float32"}
    assert v1.lineage.job_id == "raysubmit_abc"
    assert v1.lineage.storage_region == "me-central-1"
    assert v1.lineage.extra == {"trained_on": "cpu"}  # unknown metadata keys are kept
    assert v1.lineage.source_uri == str(artifact)

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    v2 = register(artifact, "m", root=root, lineage={"metrics": {"accuracy": 0.95}, "storage_region": "uae-north"})
    assert v2.lineage.metrics == {"accuracy": 0.95}
    assert v2.lineage.storage_region == "uae-north"
    assert v2.lineage.job_id == "02000000"
    assert show("m@2", root=root) == v2  # what is read back equals what was returned


def test_artifact_without_metadata_registers_with_empty_lineage(tmp_path, root):
    artifact = tmp_path / "bare"
    artifact.mkdir()
    (artifact / "weights.bin").write_bytes(b"")  # an empty file is still a file
    version = register(artifact, "bare", root=root)
    assert version.lineage.metrics == {} and version.lineage.spec is None
    fetch("bare", tmp_path / "out", root=root)
    assert (tmp_path / "out" / "weights.bin").read_bytes() == b""


def test_references_name_latest_number_and_alias(tmp_path, root):
    for accuracy in (0.8, 0.85, 0.9):
        register(make_artifact(tmp_path / f"a{accuracy}", accuracy=accuracy), "m", root=root)
    set_alias("m", "production", 2, root=root)
    assert resolve("m", root=root).version == 3
    assert resolve("m@latest", root=root).version == 3
    assert resolve("m@1", root=root).lineage.metrics["accuracy"] == 0.8
    assert resolve("m@production", root=root).version == 2
    assert [v.version for v in list_versions("m", root=root)] == [1, 2, 3]
    assert list_models(root=root) == ["m"]


def test_root_may_be_a_file_uri_or_come_from_the_environment(tmp_path, root, monkeypatch):
    register(make_artifact(tmp_path / "a"), "m", root=f"file://{root}")
    monkeypatch.setenv("MLPLATFORM_REGISTRY_ROOT", str(root))
    assert register(make_artifact(tmp_path / "b"), "m").version == 2
    assert [v.version for v in list_versions("m")] == [1, 2]
    assert resolve("m@1", root=root).uri == f"{root}/m/versions/1/files"


def test_promote_copies_canary_target_and_rollback_walks_back(tmp_path, root):
    for i in range(3):
        register(make_artifact(tmp_path / f"a{i}"), "m", root=root)
    set_alias("m", "production", 1, root=root, actor="alice")
    set_alias("m", "canary", 2, root=root, actor="bob")
    move = promote("m", root=root, actor="carol", reason="canary healthy for 24h")
    assert (move.alias, move.from_version, move.to_version, move.source_alias) == ("production", 1, 2, "canary")
    assert list_aliases("m", root=root) == {"canary": 2, "production": 2}

    set_alias("m", "production", 3, root=root, actor="dave")
    back = rollback("m", "production", root=root, actor="erin", reason="p99 latency regression")
    assert (back.from_version, back.to_version, back.action) == (3, 2, "rollback")
    assert resolve("m@production", root=root).version == 2
    assert rollback("m", "production", root=root).to_version == 1  # one more step back
    with pytest.raises(AliasNotFound, match="no earlier target"):
        rollback("m", "production", root=root)

    history = alias_history("m", "production", root=root)
    assert [(h.action, h.from_version, h.to_version, h.actor) for h in history] == [
        ("set", None, 1, "alice"),
        ("promote", 1, 2, "carol"),
        ("set", 2, 3, "dave"),
        ("rollback", 3, 2, "erin"),
        ("rollback", 2, 1, history[-1].actor),
    ]
    assert history[1].reason == "canary healthy for 24h" and history[3].reason == "p99 latency regression"
    assert all(h.at.endswith("Z") for h in history)
    assert len(alias_history("m", root=root)) == 6  # includes the canary move


def test_set_alias_accepts_another_alias_or_latest(tmp_path, root):
    for i in range(2):
        register(make_artifact(tmp_path / f"a{i}"), "m", root=root)
    set_alias("m", "canary", "latest", root=root)
    set_alias("m", "staging", "canary", root=root)
    set_alias("m", "production", "1", root=root)
    assert list_aliases("m", root=root) == {"canary": 2, "production": 1, "staging": 2}


def test_diff_reports_metrics_spec_lineage_and_files(tmp_path, root):
    a = make_artifact(tmp_path / "a", accuracy=0.9, lr=0.1)
    b = make_artifact(tmp_path / "b", accuracy=0.93, lr=0.05, weights=b"x" * 300)
    (b / "samples" / "reference.npz").unlink()
    (b / "tokenizer.json").write_text("{}")
    register(a, "m", root=root)
    register(b, "m", root=root, lineage={"dataset_fingerprint": "sha256:beef"})
    set_alias("m", "production", 2, root=root)

    d = diff("m", 1, "production", root=root)
    assert (d.a, d.b) == (1, 2)
    assert d.metrics == {"accuracy": (0.9, 0.93)}
    assert d.spec == {"optim.lr": (0.1, 0.05)}
    assert d.lineage == {"dataset_fingerprint": ("sha256:feedface", "sha256:beef")}
    assert d.files_added == ("tokenizer.json",)
    assert d.files_removed == ("samples/reference.npz",)
    assert d.files_changed == ("metadata.json", "model.safetensors")


def test_crash_during_copy_leaves_no_visible_version(tmp_path, root, monkeypatch):
    register(make_artifact(tmp_path / "a"), "m", root=root)
    index_before = read_index(Store(root), "m")
    real_copy = _register._copy_file
    calls = []

    def copy_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # like a Ctrl-C halfway through the files
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(_register, "_copy_file", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        register(make_artifact(tmp_path / "b"), "m", root=root)
    assert read_index(Store(root), "m") == index_before
    assert list((root / "m" / ".staging").iterdir()) == []
    assert sorted(p.name for p in (root / "m" / "versions").iterdir()) == ["1"]


def test_orphan_version_directory_is_invisible_and_its_number_not_reused(tmp_path, root):
    register(make_artifact(tmp_path / "a"), "m", root=root)
    # What a crash between moving the files into place and committing the index leaves.
    (root / "m" / "versions" / "2" / "files").mkdir(parents=True)
    assert [v.version for v in list_versions("m", root=root)] == [1]
    assert register(make_artifact(tmp_path / "b"), "m", root=root).version == 3
    assert [v.version for v in list_versions("m", root=root)] == [1, 3]


def test_object_store_code_path_round_trips(tmp_path, root, monkeypatch, metadata_backend):
    # S3/GCS cannot run here; drive the same non-local branch (one PUT per file, no rename-replace)
    # over a local directory instead.
    real_init = _store.Store.__init__

    def as_object_store(self, root_arg):
        real_init(self, root_arg)
        self.local = False

    monkeypatch.setattr(_store.Store, "__init__", as_object_store)
    artifact = make_artifact(tmp_path / "a")
    if metadata_backend == "sqlite":
        # An object store cannot lock an index: without a shared database it is refused up front.
        with pytest.raises(RegistryError, match="object store.*Set MLPLATFORM_METADATA_URL="):
            register(artifact, "m", root=root)
        assert not (root / "m" / "versions").exists() and list((root / "m" / ".staging").iterdir()) == []
        monkeypatch.setenv("MLPLATFORM_METADATA_URL", f"sqlite:///{tmp_path}/shared.db")
    register(artifact, "m", root=root)
    register(make_artifact(tmp_path / "b", accuracy=0.95), "m", root=root, encrypt_key=b"k" * 32)
    set_alias("m", "production", 2, root=root)
    fetch("m@production", tmp_path / "out", root=root, key=b"k" * 32)
    assert tree(tmp_path / "out") == tree(tmp_path / "b")
    assert not (root / "registry.db").exists()


def test_a_registry_copied_elsewhere_keeps_its_index(tmp_path, root, metadata_backend):
    import shutil

    register(make_artifact(tmp_path / "a"), "m", root=root)
    set_alias("m", "production", 1, root=root)
    copy = tmp_path / "restored"
    shutil.copytree(root, copy)
    if metadata_backend == "sqlite":  # the embedded index travels with the root
        assert list_aliases("m", root=copy) == {"production": 1} and verify("m@1", root=copy).ok
    else:  # a shared database tells roots apart by their URI: the copy is a new, empty registry
        assert list_models(root=copy) == []
