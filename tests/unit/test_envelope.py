"""Envelope encryption of restricted artifacts and the cluster's key: round trip, tampering,
rotation without re-encryption, restricted registry versions encrypted and served from memory."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import uae_test_policy
from mlplatform import registry, residency
from mlplatform._internal import envelope, keyring, metadata
from mlplatform.errors import EncryptionKeyError, IntegrityError


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch) -> Path:
    """A home of its own (so the cluster key is this test's), no operator key, no cluster."""
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    for var in ("MLPLATFORM_REGISTRY_KEY", "MLPLATFORM_REGISTRY_KEY_FILE", residency.CLUSTER_ENV,
                residency.POLICY_ENV, metadata.URL_ENV):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def checkpoint(directory: Path) -> Path:
    (directory / "ds").mkdir(parents=True)
    torch.save({"w": torch.arange(6.0)}, directory / "ds" / "mp_rank_00_model_states.pt")
    (directory / "latest").write_text("ds")
    return directory


def test_key_is_created_once_private_and_never_shown(private_home, monkeypatch):
    ring = keyring.cluster_keyring()
    path = keyring.key_dir() / keyring.CURRENT
    assert path == private_home / "keys" / "current.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert keyring.cluster_keyring().current_id == ring.current_id  # the same key next time
    assert path.read_text().strip() not in repr(ring)
    # With a cluster, the key lives beside that cluster's auth token.
    monkeypatch.setenv(residency.CLUSTER_ENV, "three-region")
    assert keyring.key_dir() == private_home / "clusters" / "three-region" / "keys"


def test_checkpoint_round_trip_and_torch_cannot_read_the_ciphertext(tmp_path):
    ring = keyring.cluster_keyring()
    ckpt = checkpoint(tmp_path / "ckpt")
    assert envelope.encrypt_tree(ckpt, ring) == 2
    with pytest.raises(Exception):  # noqa: B017 - torch sees no checkpoint at all
        torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    envelope.decrypt_tree(ckpt, tmp_path / "plain", ring)
    assert torch.equal(torch.load(tmp_path / "plain" / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["w"],
                       torch.arange(6.0))
    assert (tmp_path / "plain" / "latest").read_text() == "ds"


@pytest.mark.parametrize("damage", ["flip-chunk", "truncate", "header", "swap", "plaintext", "symlink"])
def test_tampered_files_are_refused_naming_the_file(tmp_path, damage):
    ring = keyring.cluster_keyring()
    ckpt = checkpoint(tmp_path / "ckpt")
    envelope.encrypt_tree(ckpt, ring)
    target = ckpt / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(target.read_bytes())
    if damage == "flip-chunk":
        data[-3] ^= 1
    elif damage == "truncate":
        data = data[:-40]
    elif damage == "header":
        data = data.replace(b'"chunk_bytes"', b'"chunk_bytez"')
    elif damage == "swap":  # a valid encrypted file from another place
        data = bytearray((ckpt / "latest").read_bytes())
    elif damage == "plaintext":
        target.unlink()
        torch.save({"evil": 1}, target)
        data = bytearray(target.read_bytes())
    target.unlink()
    if damage == "symlink":
        target.symlink_to("/etc/passwd")
    else:
        target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="mp_rank_00_model_states.pt") as info:
        envelope.decrypt_tree(ckpt, tmp_path / "out", ring)
    assert "Refusing" in str(info.value) or "Restore" in str(info.value) or "Remove" in str(info.value)


def test_another_clusters_key_is_named_not_guessed(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "ckpt")
    envelope.encrypt_tree(ckpt, keyring.cluster_keyring())
    monkeypatch.setenv(residency.CLUSTER_ENV, "other")
    with pytest.raises(EncryptionKeyError, match=r"mp_rank_00_model_states.pt is encrypted under key 'local:"):
        envelope.decrypt_tree(ckpt, tmp_path / "out", keyring.cluster_keyring())


def test_rotation_rewraps_headers_without_reencrypting_data(tmp_path):
    ring = keyring.cluster_keyring()
    ckpt = checkpoint(tmp_path / "ckpt")
    envelope.encrypt_tree(ckpt, ring)
    target = ckpt / "ds" / "mp_rank_00_model_states.pt"
    before = target.read_bytes()
    old, new, count = keyring.rotate_and_rewrap([str(ckpt)])
    assert old == ring.current_id and new != old and count == 2
    after = target.read_bytes()
    # Same encrypted chunks (same nonces), new header: the data was not re-encrypted.
    body = lambda raw: raw[len(envelope.MAGIC) + 4 + int.from_bytes(raw[8:12], "big"):]  # noqa: E731
    assert body(after) == body(before) and after != before
    assert json.loads(after[12:12 + int.from_bytes(after[8:12], "big")])["key_id"] == new
    # Opens with the new key; an unrotated file still opens through the retired key.
    envelope.decrypt_tree(ckpt, tmp_path / "plain", keyring.cluster_keyring())
    assert os.listdir(keyring.key_dir() / keyring.RETIRED) == [old.split(":")[1] + ".key"]


def test_operator_key_is_used_and_not_rotated_here(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_REGISTRY_KEY", registry.generate_key())
    ring = keyring.cluster_keyring()
    assert not ring.managed and "MLPLATFORM_REGISTRY_KEY" in ring.where
    assert not (keyring.key_dir() / keyring.CURRENT).exists()
    with pytest.raises(EncryptionKeyError, match="operator holds"):
        keyring.rotate()


def test_restricted_registry_version_is_encrypted_and_read_in_memory(tmp_path, monkeypatch):
    policy = uae_test_policy(tmp_path / "uae")
    monkeypatch.setenv(residency.POLICY_ENV, residency.encode(policy))
    assert keyring.restricted(policy, "uae-restricted") and not keyring.restricted(policy, "internal")
    assert keyring.CLUSTER_ENV == residency.CLUSTER_ENV  # one variable, named in two layers
    art = tmp_path / "uae" / "art"
    art.mkdir(parents=True)
    (art / "model.onnx").write_bytes(b"onnx-bytes" * 100)
    (art / "metadata.json").write_text(json.dumps({"classification": "uae-restricted"}))
    root = tmp_path / "uae" / "registry"
    version = registry.register(art, "m", root=root, lineage={"classification": "uae-restricted"})
    assert version.encrypted and version.encryption.key_id == keyring.cluster_keyring().current_id
    stored = (root / "m" / "versions" / "1" / "files" / "model.onnx").read_bytes()
    assert b"onnx-bytes" not in stored
    from mlplatform.registry._integrity import read_verified

    _, files = read_verified("m@1", root=root)  # the cluster key is the registry's default key
    assert files["model.onnx"] == b"onnx-bytes" * 100


def test_restricted_lineage_is_sealed_in_the_manifest(tmp_path, monkeypatch):
    policy = uae_test_policy(tmp_path / "uae")
    monkeypatch.setenv(residency.POLICY_ENV, residency.encode(policy))
    art = tmp_path / "uae" / "art"
    art.mkdir(parents=True)
    (art / "model.onnx").write_bytes(b"m")
    meta = {"classification": "uae-restricted", "metrics": {"val_accuracy": 0.975}, "spec": {"lr": 0.0123},
            "dataset_fingerprint": "sha256:" + "ab" * 32}
    (art / "metadata.json").write_text(json.dumps(meta))
    root = tmp_path / "uae" / "registry"
    registry.register(art, "m", root=root, lineage={"classification": "uae-restricted"})
    manifest = (root / "m" / "versions" / "1" / "manifest.json").read_text()
    for secret in ("0.975", "0.0123", "ab" * 32, "val_accuracy"):
        assert secret not in manifest
    assert '"classification": "uae-restricted"' in manifest  # residency reads it without the key
    # With the cluster key (the registry's default), the lineage reads back whole.
    shown = registry.show("m@1", root=root)
    assert shown.lineage.metrics == {"val_accuracy": 0.975} and shown.lineage.spec == {"lr": 0.0123}
    # Without it (another home, no key), the version is listed but its lineage stays sealed.
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "elsewhere"))
    assert registry.show("m@1", root=root).lineage.metrics == {}


def test_restricted_onnx_version_is_served_from_memory_with_its_drift_sample(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    import pyarrow as pa
    import pyarrow.parquet as pq
    from onnx import TensorProto, helper, numpy_helper

    from mlplatform.serve._models import OnnxCpuModel

    policy = uae_test_policy(tmp_path / "uae")
    monkeypatch.setenv(residency.POLICY_ENV, residency.encode(policy))
    art = tmp_path / "uae" / "art"
    art.mkdir(parents=True)
    weight = numpy_helper.from_array(np.eye(2, dtype=np.float32) * 2, "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(art / "model.onnx"))
    pq.write_table(pa.table({"a": [0.0, 1.0, 2.0], "b": [1.0, 2.0, 3.0]}), art / "reference_sample.parquet")
    (art / "metadata.json").write_text(json.dumps({"classification": "uae-restricted", "task": "regression"}))
    root = tmp_path / "uae" / "registry"
    assert registry.register(art, "m", root=root, lineage={"classification": "uae-restricted"}).encrypted
    model = OnnxCpuModel({"ref": "m@1", "root": str(root), "variant": "onnx_fp32", "role": "primary", "app": "a",
                          "drift_enabled": True, "drift_window_rows": 10, "drift_alert_psi": 0.2,
                          "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "num_cpus": 1})
    assert model.memory is not None and not model.dir.exists()  # nothing decrypted onto disk
    assert model._drift is not None and model.features == ["a", "b"]
    np.testing.assert_allclose(model._run(np.array([[1.0, 2.0]], np.float32)), [[2.0, 4.0]])


def test_rotation_rewraps_registry_versions_and_survives_a_crash_before_the_rename(tmp_path, monkeypatch):
    from mlplatform.cli import main
    from mlplatform.registry._index import REWRAPPED_SUFFIX

    policy = uae_test_policy(tmp_path / "uae")
    monkeypatch.setenv(residency.POLICY_ENV, residency.encode(policy))
    art = tmp_path / "uae" / "art"
    art.mkdir(parents=True)
    (art / "model.onnx").write_bytes(b"weights" * 10)
    (art / "metadata.json").write_text(json.dumps({"metrics": {"acc": 0.5}}))
    root = tmp_path / "uae" / "registry"
    registry.register(art, "m", root=root, lineage={"classification": "uae-restricted"})
    files = root / "m" / "versions" / "1" / "files"
    stored = (files / "model.onnx").read_bytes()
    old = keyring.cluster_keyring().current_id
    assert main(["keys", "rotate", "--registry-root", str(root)]) == 0
    new = keyring.cluster_keyring().current_id
    assert new != old and registry.show("m@1", root=root).encryption.key_id == new
    assert (files / "model.onnx").read_bytes() == stored  # not re-encrypted
    # Readable with the new key alone: the retired key is not needed any more.
    for retired in (keyring.key_dir() / keyring.RETIRED).iterdir():
        retired.unlink()
    _, plain = registry.read_verified("m@1", root=root)
    assert plain["model.onnx"] == b"weights" * 10
    assert registry.show("m@1", root=root).lineage.metrics == {"acc": 0.5}
    # A rotation interrupted after the index recorded the new manifest but before the rename.
    manifest = root / "m" / "versions" / "1" / "manifest.json"
    keyring.rotate()
    before = manifest.read_bytes()
    monkeypatch.setattr(registry._rewrap.Store, "move", lambda self, src, dst: None)  # the crash
    assert registry.rewrap(root, keyring.cluster_keyring()) == 1
    assert manifest.read_bytes() == before and Path(str(manifest) + REWRAPPED_SUFFIX).exists()
    assert registry.verify("m@1", root=root).ok and registry.read_verified("m@1", root=root)[1]["model.onnx"]
