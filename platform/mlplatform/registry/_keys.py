"""Master keys for encryption at rest, and the `KeyProvider` hook for a KMS.

Envelope encryption: each version gets a fresh random 256-bit data key that encrypts
its files; the provider only wraps and unwraps that data key. A local provider wraps
with AES-256-GCM under a master key from an environment variable or a key file; a KMS
provider implements the same two methods with the KMS's encrypt/decrypt calls (its
`context` maps to the KMS encryption context), so the master key never leaves the KMS.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

# Local keys live in _internal (the cluster keyring uses them too); re-exported here, their public home.
from mlplatform._internal.keys import (
    KEY_ENV,
    KEY_FILE_ENV,
    LocalKey,
    _decode,
    generate_key,
    key_from_env,
    key_from_file,
)
from mlplatform.errors import EncryptionKeyError

__all__ = ["KEY_ENV", "KEY_FILE_ENV", "KeyProvider", "LocalKey", "as_provider", "default_key", "generate_key",
           "key_from_env", "key_from_file"]


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps per-version data keys; implement it to plug in a KMS."""

    @property
    def key_id(self) -> str:
        """A stable, non-secret identifier of the master key, recorded in each manifest."""
        ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """Encrypt `data_key`, bound to `context`."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Decrypt a wrapped data key; raise any exception if this is not the right key."""
        ...


def default_key() -> KeyProvider | None:
    """The key from MLPLATFORM_REGISTRY_KEY, else MLPLATFORM_REGISTRY_KEY_FILE, else the cluster's
    keyring if one was made (mlplatform._internal.keyring, which restricted versions use), else None."""
    if os.environ.get(KEY_ENV):
        return key_from_env(KEY_ENV)
    if os.environ.get(KEY_FILE_ENV):
        return key_from_file(os.environ[KEY_FILE_ENV])
    from mlplatform._internal import keyring

    if (keyring.key_dir() / keyring.CURRENT).exists():
        return keyring.cluster_keyring(create=False)
    return None


def as_provider(key: KeyProvider | bytes | str | None, field: str) -> KeyProvider | None:
    """Accept a KeyProvider, 32 raw bytes, or base64/hex text; None stays None."""
    if key is None or isinstance(key, KeyProvider):
        return key
    if isinstance(key, bytes):
        return LocalKey(key, f"`{field}`")
    if isinstance(key, str):
        return LocalKey(_decode(key, f"`{field}`"), f"`{field}`")
    raise EncryptionKeyError(
        f"Got a {type(key).__name__} for `{field}`; must be a KeyProvider, 32 bytes, or the "
        f"base64/hex text of 32 bytes (e.g. key_from_env() or key_from_file(path))."
    )


