"""Restricted data's checkpoints on storage, as a real training run writes them (the session's
`trained_digits` run of the shipped uae-restricted digits spec): ciphertext that torch cannot
read, which the platform opens with the cluster's key and refuses once tampered with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from mlplatform._internal import envelope, keyring
from mlplatform.errors import IntegrityError
from mlplatform.train import checkpoints


@pytest.fixture(scope="module")
def newest_checkpoint(trained_digits: Path) -> Path:
    # <storage_path>/digits-zero2/{artifact, checkpoint_step*}: the run beside its artifact.
    found = sorted(trained_digits.parent.glob("checkpoint_step*"))
    assert found, f"no checkpoints beside {trained_digits}"
    return found[-1]


def stored_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and not p.name.startswith(checkpoints.MANIFEST)]


def test_restricted_checkpoint_is_not_a_torch_file_without_the_key(ray_on_three_region, newest_checkpoint):
    files = stored_files(newest_checkpoint)
    names = {p.name for p in files}
    assert {"rng_rank0.pt", "rng_rank1.pt", "model.safetensors", "mp_rank_00_model_states.pt"} <= names, names
    for path in files:
        assert envelope.is_encrypted(path), path
        if path.suffix == ".pt":
            with pytest.raises(Exception):  # noqa: B017 - any failure to parse: torch sees no checkpoint
                torch.load(path, weights_only=False)
    # The consolidated weights are not safetensors either.
    from safetensors import safe_open

    with pytest.raises(Exception):  # noqa: B017 - any failure to parse
        safe_open(str(newest_checkpoint / "model.safetensors"), "pt")


def test_the_platform_opens_it_with_the_cluster_key(ray_on_three_region, newest_checkpoint, tmp_path, trained_digits):
    ring = keyring.cluster_keyring(create=False)
    from mlplatform import residency

    assert keyring.restricted(residency.current(), "uae-restricted")
    plain = tmp_path / "plain"
    count = envelope.decrypt_tree(newest_checkpoint, plain, ring, plain_ok=(checkpoints.MANIFEST,))
    assert count == len(stored_files(newest_checkpoint))
    # Every file loads without unpickling code (torch.load weights_only=True).
    for path in plain.rglob("rng_rank*.pt"):
        state = torch.load(path, weights_only=True)
        assert set(state) >= {"python", "numpy", "torch"}
    model_states = next(plain.rglob("mp_rank_00_model_states.pt"))
    assert "module" in torch.load(model_states, weights_only=True)
    # The final checkpoint's weights are the artifact's, byte for byte.
    assert (plain / "model.safetensors").read_bytes() == (trained_digits / "model.safetensors").read_bytes()


def test_a_tampered_checkpoint_is_refused_naming_the_file(ray_on_three_region, newest_checkpoint, tmp_path):
    ring = keyring.cluster_keyring(create=False)
    copy = tmp_path / newest_checkpoint.name
    shutil.copytree(newest_checkpoint, copy)
    target = copy / "rng_rank0.pt"
    data = bytearray(target.read_bytes())
    data[-20] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"rng_rank0\.pt.*fails authentication"):
        envelope.decrypt_tree(copy, tmp_path / "out", ring, plain_ok=(checkpoints.MANIFEST,))
    # A plaintext pickle dropped in place of an encrypted file is refused too, never unpickled.
    target.unlink()
    torch.save({"x": torch.zeros(1)}, target)
    with pytest.raises(IntegrityError, match=r"rng_rank0\.pt is not encrypted"):
        envelope.decrypt_tree(copy, tmp_path / "out2", ring, plain_ok=(checkpoints.MANIFEST,))
