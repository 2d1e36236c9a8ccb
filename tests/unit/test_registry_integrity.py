"""Registry integrity and encryption at rest: tampering, missing files, keys."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
from pathlib import Path

import pytest

from mlplatform.errors import EncryptionKeyError, IntegrityError
from mlplatform.registry import (
    LocalKey,
    fetch,
    generate_key,
    key_from_env,
    key_from_file,
    list_versions,
    register,
    show,
    verify,
)
from mlplatform.registry import _register

# Every test runs on the embedded SQLite store and on a live PostgreSQL server.
pytestmark = pytest.mark.usefixtures("metadata_backend")

WEIGHTS = bytes(range(256)) * 4


def make_artifact(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(WEIGHTS)
    (path / "metadata.json").write_text(json.dumps({"metrics": {"accuracy": 0.9}}))
    return path


def stored(root: Path, name: str, version: int, rel: str) -> Path:
    return root / name / "versions" / str(version) / "files" / rel


def record_manifest_hash(root: Path, name: str, version: int, sha256: str) -> None:
    """What an attacker with write access to the metadata database too would do."""
    import sqlalchemy as sa

    from mlplatform._internal.metadata import tables
    from mlplatform.registry._index import database, registry_key
    from mlplatform.registry._store import Store

    store = Store(root)
    rows = tables.registry_versions
    with database(store).begin() as conn:
        conn.execute(sa.update(rows).where(rows.c.registry == registry_key(store), rows.c.name == name,
                                           rows.c.version == version).values(manifest_sha256=sha256))


def assert_nothing_left(dest: Path) -> None:
    assert not dest.exists()
    assert not list(dest.parent.glob(f".{dest.name}.partial-*"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def plain(tmp_path: Path, root: Path) -> Path:
    """A registry holding one unencrypted version `m@1`."""
    register(make_artifact(tmp_path / "artifact"), "m", root=root)
    return root


def refused(root: Path, dest: Path, match: str) -> IntegrityError:
    with pytest.raises(IntegrityError, match=match) as info:
        fetch("m@1", dest, root=root)
    assert_nothing_left(dest)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args
    return info.value


def test_one_flipped_byte_is_refused_naming_the_file(plain, tmp_path):
    path = stored(plain, "m", 1, "model.safetensors")
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    error = refused(plain, tmp_path / "out", "model.safetensors: sha256")
    assert "modified after registration" in str(error) and "Nothing was copied" in str(error)
    report = verify("m@1", root=plain)
    assert not report.ok and [(p.path, p.kind) for p in report.problems] == [("model.safetensors", "sha256")]


def test_truncated_file_is_refused(plain, tmp_path):
    path = stored(plain, "m", 1, "model.safetensors")
    path.write_bytes(path.read_bytes()[:-1])
    refused(plain, tmp_path / "out", r"model.safetensors: is 1023 bytes, the manifest records 1024")


def test_deleted_file_is_refused(plain, tmp_path):
    stored(plain, "m", 1, "model.safetensors").unlink()
    refused(plain, tmp_path / "out", "model.safetensors: missing")
    assert [p.kind for p in verify("m@1", root=plain).problems] == ["missing"]


def test_added_file_is_refused(plain, tmp_path):
    stored(plain, "m", 1, "backdoor.py").write_text("import os")
    refused(plain, tmp_path / "out", "backdoor.py: present but not in the manifest")


def test_edited_manifest_is_refused(plain, tmp_path):
    manifest = plain / "m" / "versions" / "1" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["lineage"]["metrics"]["accuracy"] = 0.99  # someone polishing the numbers
    manifest.write_text(json.dumps(data))
    with pytest.raises(IntegrityError, match="manifest.json was modified"):
        fetch("m@1", tmp_path / "out", root=plain)
    assert_nothing_left(tmp_path / "out")
    with pytest.raises(IntegrityError, match="manifest.json was modified"):
        show("m@1", root=plain)


def test_fetch_into_existing_empty_directory(plain, tmp_path):
    (tmp_path / "out").mkdir()
    fetch("m", tmp_path / "out", root=plain)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == WEIGHTS


# --- encryption at rest ---


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def encrypted(tmp_path: Path, root: Path, key: str) -> Path:
    """A registry holding one encrypted version `m@1`."""
    register(make_artifact(tmp_path / "artifact"), "m", root=root, encrypt_key=key)
    return root


def test_encrypted_round_trip_and_ciphertext_at_rest(encrypted, tmp_path, key):
    ciphertext = stored(encrypted, "m", 1, "model.safetensors").read_bytes()
    assert WEIGHTS[:64] not in ciphertext and len(ciphertext) == len(WEIGHTS) + 12 + 16
    version = fetch("m@1", tmp_path / "out", root=encrypted, key=key)
    assert version.encrypted and version.encryption.algorithm == "AES-256-GCM"
    assert version.encryption.key_id == LocalKey(base64.b64decode(key)).key_id
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == WEIGHTS
    assert key not in json.dumps(json.loads((encrypted / "m" / "versions" / "1" / "manifest.json").read_text()))


def test_key_from_env_var_or_key_file_in_hex_base64_or_raw(encrypted, tmp_path, key, monkeypatch):
    raw = base64.b64decode(key)
    monkeypatch.setenv("MLPLATFORM_REGISTRY_KEY", raw.hex())
    fetch("m", tmp_path / "via-env", root=encrypted)  # no key argument: the variable is used
    assert key_from_env().key_id == LocalKey(raw).key_id
    monkeypatch.delenv("MLPLATFORM_REGISTRY_KEY")
    for i, content in enumerate([key.encode() + b"\n", raw.hex().encode(), raw]):
        (tmp_path / f"key{i}").write_bytes(content)
        assert key_from_file(tmp_path / f"key{i}").key_id == LocalKey(raw).key_id
    monkeypatch.setenv("MLPLATFORM_REGISTRY_KEY_FILE", str(tmp_path / "key2"))
    fetch("m", tmp_path / "via-file", root=encrypted)
    assert (tmp_path / "via-file" / "model.safetensors").read_bytes() == WEIGHTS


def test_wrong_key_is_refused_clearly(encrypted, tmp_path):
    with pytest.raises(EncryptionKeyError, match=r"Wrong key for model 'm' version 1") as info:
        fetch("m@1", tmp_path / "out", root=encrypted, key=generate_key())
    assert "it was encrypted with local:" in str(info.value)
    assert_nothing_left(tmp_path / "out")
    with pytest.raises(EncryptionKeyError, match="Wrong key"):
        verify("m@1", root=encrypted, key=generate_key())


def test_no_key_for_an_encrypted_version_is_refused(encrypted, tmp_path, monkeypatch):
    monkeypatch.delenv("MLPLATFORM_REGISTRY_KEY", raising=False)
    monkeypatch.delenv("MLPLATFORM_REGISTRY_KEY_FILE", raising=False)
    # Nor a cluster keyring an earlier test made under the session's MLPLATFORM_HOME (the fallback).
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    with pytest.raises(EncryptionKeyError, match="is encrypted and no key was given.*MLPLATFORM_REGISTRY_KEY"):
        fetch("m@1", tmp_path / "out", root=encrypted)
    assert_nothing_left(tmp_path / "out")


def test_tampered_ciphertext_is_detected_without_and_with_the_key(encrypted, tmp_path, key):
    path = stored(encrypted, "m", 1, "model.safetensors")
    data = bytearray(path.read_bytes())
    data[100] ^= 0x80
    path.write_bytes(bytes(data))
    without_key = verify("m@1", root=encrypted)
    assert not without_key.plaintext_checked
    assert [(p.path, p.kind) for p in without_key.problems] == [("model.safetensors", "sha256")]
    with pytest.raises(IntegrityError, match="model.safetensors"):
        fetch("m@1", tmp_path / "out", root=encrypted, key=key)
    assert_nothing_left(tmp_path / "out")


def test_swapped_ciphertexts_fail_authentication(tmp_path, root, key):
    # Swap two same-size encrypted files and their manifest entries, as an attacker who
    # edits the manifest consistently would: AES-GCM's associated data still catches it.
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "a.bin").write_bytes(b"A" * 100)
    (artifact / "b.bin").write_bytes(b"B" * 100)
    register(artifact, "m", root=root, encrypt_key=key)
    a, b = stored(root, "m", 1, "a.bin"), stored(root, "m", 1, "b.bin")
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    manifest_path = root / "m" / "versions" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entries = {f["path"]: dict(f) for f in manifest["files"]}
    for f in manifest["files"]:
        other = entries["b.bin" if f["path"] == "a.bin" else "a.bin"]
        f["stored_sha256"], f["stored_size"] = other["stored_sha256"], other["stored_size"]
    manifest_path.write_text(json.dumps(manifest))
    record_manifest_hash(root, "m", 1, hashlib.sha256(manifest_path.read_bytes()).hexdigest())

    report = verify("m@1", root=root, key=key)
    assert sorted((p.path, p.kind) for p in report.problems) == [
        ("a.bin", "authentication"), ("b.bin", "authentication"),
    ]


def test_multi_chunk_and_empty_files_round_trip_encrypted(tmp_path, root, key, monkeypatch):
    monkeypatch.setattr(_register, "CHUNK_BYTES", 64)  # many chunks without big files
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    files = {"exact.bin": b"e" * 128, "ragged.bin": WEIGHTS + b"tail", "empty.bin": b""}
    for rel, data in files.items():
        (artifact / rel).write_bytes(data)
    register(artifact, "m", root=root, encrypt_key=key)
    fetch("m", tmp_path / "out", root=root, key=key)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files

    # Dropping the last chunk must not pass as a shorter, valid file.
    path = stored(root, "m", 1, "exact.bin")
    path.write_bytes(path.read_bytes()[: 64 + 28])
    assert {p.kind for p in verify("m@1", root=root, key=key).problems} == {"size"}


def test_malformed_keys_are_refused_before_writing(tmp_path, root, monkeypatch):
    artifact = make_artifact(tmp_path / "artifact")
    for bad in ("not-a-key", base64.b64encode(b"short").decode(), b"0" * 31):
        with pytest.raises(EncryptionKeyError, match="32 bytes"):
            register(artifact, "m", root=root, encrypt_key=bad)
    monkeypatch.setenv("MLPLATFORM_REGISTRY_KEY", "zz")
    with pytest.raises(EncryptionKeyError, match="MLPLATFORM_REGISTRY_KEY"):
        key_from_env()
    with pytest.raises(EncryptionKeyError, match="Cannot read key file"):
        key_from_file(tmp_path / "missing.key")
    assert not root.exists()
    assert "key_id" in repr(LocalKey(b"k" * 32)) and "kkkk" not in repr(LocalKey(b"k" * 32))


def test_mixed_encrypted_and_plain_versions(encrypted, tmp_path, key):
    register(make_artifact(tmp_path / "plain-artifact"), "m", root=encrypted)
    assert [v.encrypted for v in list_versions("m", root=encrypted)] == [True, False]
    fetch("m@2", tmp_path / "out", root=encrypted)  # the plain one needs no key
