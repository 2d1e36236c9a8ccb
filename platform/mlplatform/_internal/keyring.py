"""The cluster's key: the one place that finds, creates and rotates the key wrapping artifact data keys.

Where it lives, first found wins:
  1. MLPLATFORM_REGISTRY_KEY / MLPLATFORM_REGISTRY_KEY_FILE (the registry's key source): an
     operator-held key, e.g. a KubeRay Secret mounted on every pod. The operator rotates it.
  2. <MLPLATFORM_HOME>/clusters/<cluster>/keys/ beside the cluster's auth_token (the cluster is
     MLPLATFORM_CLUSTER, set on every node by `cluster up` and by connect()); without a cluster,
     <MLPLATFORM_HOME>/keys/. `current.key` (0600, created on first use) wraps new data keys;
     `retired/<id>.key` keep older keys so files not yet re-wrapped still open.

Restricted data is data whose residency classification says `encrypt_at_rest: true` in the cluster's
policy (e.g. uae-restricted): its checkpoints, drift samples and exported models are encrypted.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

from mlplatform._internal import storage
from mlplatform._internal.keys import KEY_ENV, KEY_FILE_ENV, LocalKey, key_from_env, key_from_file
from mlplatform.errors import EncryptionKeyError, IntegrityError

# The same variable as mlplatform.residency.CLUSTER_ENV (a unit test checks): _internal sits below
# the capabilities and cannot import it.
CLUSTER_ENV = "MLPLATFORM_CLUSTER"
CURRENT = "current.key"
RETIRED = "retired"


class Keyring:
    """The current key (wraps) and retired ones (still unwrap), by key id. Never shows a key."""

    def __init__(self, current: LocalKey, retired: list[LocalKey], where: str, managed: bool) -> None:
        self.current = current
        self._keys = {k.key_id: k for k in [*retired, current]}
        self.where = where  # a description of where the keys live, for errors
        self.managed = managed  # False: an operator-held key this module must not rotate

    def __repr__(self) -> str:
        return f"Keyring(current={self.current.key_id!r}, keys={len(self._keys)}, where={self.where!r})"

    @property
    def current_id(self) -> str:
        return self.current.key_id

    # The registry's KeyProvider protocol (key_id, wrap, unwrap): the registry encrypts restricted
    # versions with the same key, and opens versions wrapped by a retired one.
    @property
    def key_id(self) -> str:
        return self.current.key_id

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        return self.current.wrap(data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        for key in [self.current, *(k for k in self._keys.values() if k is not self.current)]:
            try:
                return key.unwrap(wrapped, context)
            except Exception:  # InvalidTag: not this key
                continue
        raise EncryptionKeyError(f"None of the keys in {self.where} unwraps this data key.")

    def seal_key(self, data_key: bytes, aad: bytes) -> tuple[str, bytes]:
        """Wrap a data key under the current key: (key id, wrapped)."""
        return self.current.key_id, self.current.wrap(data_key, aad)

    def open_key(self, key_id: str, wrapped: bytes, aad: bytes, path: str | os.PathLike[str]) -> bytes:
        """Unwrap the data key of file `path` with key `key_id`; errors name the file."""
        key = self._keys.get(key_id)
        if key is None:
            raise EncryptionKeyError(
                f"{path} is encrypted under key {key_id!r}, which {self.where} does not hold "
                f"(it holds {', '.join(sorted(self._keys))}). Load it where the cluster's key is "
                f"(MLPLATFORM_HOME and MLPLATFORM_CLUSTER of the cluster that wrote it), or set "
                f"MLPLATFORM_REGISTRY_KEY_FILE to that key's file."
            )
        try:
            return key.unwrap(wrapped, aad)
        except Exception:  # InvalidTag, or a malformed wrapped key
            raise IntegrityError(
                f"{path}: its data key does not unwrap under key {key_id!r}: the file's header was "
                f"modified or the file was moved from another place. Refusing to load it; restore it "
                f"from a good copy, or take the checkpoint/export again."
            ) from None


def key_dir() -> Path:
    """Where the platform-managed keys live (see the module docstring)."""
    cluster = os.environ.get(CLUSTER_ENV)
    return storage.home() / "clusters" / cluster / "keys" if cluster else storage.home() / "keys"


def cluster_keyring(create: bool = True) -> Keyring:
    """The cluster's keyring; with `create`, a missing platform-managed key is made (0600)."""
    if os.environ.get(KEY_ENV):
        return Keyring(key_from_env(KEY_ENV), [], f"the operator's key ({KEY_ENV})", managed=False)
    if os.environ.get(KEY_FILE_ENV):
        path = os.environ[KEY_FILE_ENV]
        return Keyring(key_from_file(path), [], f"the operator's key ({path})", managed=False)
    directory = key_dir()
    path = directory / CURRENT
    if not path.exists():
        if not create:
            raise EncryptionKeyError(
                f"No cluster key at {path}: nothing was encrypted here yet. Check MLPLATFORM_HOME and "
                f"MLPLATFORM_CLUSTER name the cluster whose artifacts these are."
            )
        _create(path)
    retired = [_read(p) for p in sorted((directory / RETIRED).glob("*.key"))]
    return Keyring(_read(path), retired, f"the cluster's keys in {directory}", managed=True)


def rotate() -> tuple[str, str]:
    """Make a new current key, keeping the old one as retired; (old id, new id).

    Files wrapped by the old key still open; re-wrap them with envelope.rewrap (`mlplatform keys
    rotate PATH...` does both), after which the retired key may be archived offline.
    """
    ring = cluster_keyring()
    if not ring.managed:
        raise EncryptionKeyError(
            f"The cluster's key is {ring.where}, which the operator holds: rotate it there (make a new "
            f"key with generate_key(), keep the old one readable until files are re-wrapped)."
        )
    directory = key_dir()
    old = ring.current
    retired = directory / RETIRED / f"{old.key_id.split(':')[-1]}.key"
    if not retired.exists():  # kept first: a crash below leaves the old key both current and retired
        _write_new(retired, (directory / CURRENT).read_bytes())
    tmp = directory / f".{CURRENT}.new"
    tmp.unlink(missing_ok=True)
    _write_new(tmp, base64.b64encode(secrets.token_bytes(32)))
    os.replace(tmp, directory / CURRENT)
    storage.fsync_dir(directory)
    return old.key_id, _read(directory / CURRENT).key_id


def restricted(policy: Any, classification: str | None) -> bool:
    """Whether data of `classification` is restricted under `policy` (a ResidencyPolicy or None).

    Restricted = its rule says `encrypt_at_rest`. Without a policy nothing is restricted.
    """
    return policy is not None and policy.rule(classification).encrypt_at_rest


def for_classification(policy: Any, classification: str | None) -> Keyring | None:
    """The cluster's keyring if data of `classification` must be encrypted at rest, else None."""
    return cluster_keyring() if restricted(policy, classification) else None


def _read(path: Path) -> LocalKey:
    return key_from_file(path)


def _create(path: Path) -> None:
    """A new random key at `path`, 0600; if another process made one first, theirs is kept."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_new(tmp, base64.b64encode(secrets.token_bytes(32)))
    try:
        os.link(tmp, path)  # atomic and exclusive: never replaces a key in use
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, data: bytes) -> None:
    # Not storage.write_private: a key is platform state, not data, so a residency confinement
    # (which limits where data may be written) must not stop it.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rotate_and_rewrap(paths: list[str]) -> tuple[str, str, int]:
    """Rotate the cluster's key, then re-wrap every envelope file below `paths`: (old id, new id, files).

    Only the small header of each file is rewritten; its encrypted chunks are copied unchanged.
    Registry versions wrapped by the old key keep opening through the retired key.
    """
    from mlplatform._internal import envelope

    old, new = rotate()
    ring = cluster_keyring(create=False)
    count = 0
    for top in paths:
        for path in sorted(Path(top).rglob("*")) if Path(top).is_dir() else [Path(top)]:
            if path.is_file() and not path.is_symlink() and envelope.is_encrypted(path):
                count += envelope.rewrap(path, ring)
    return old, new, count
