"""Master keys for encryption at rest, and the `KeyProvider` hook for a KMS.

Envelope encryption: each version gets a fresh random 256-bit data key that encrypts
its files; the provider only wraps and unwraps that data key. A local provider wraps
with AES-256-GCM under a master key from an environment variable or a key file; a KMS
provider implements the same two methods with the KMS's encrypt/decrypt calls (its
`context` maps to the KMS encryption context), so the master key never leaves the KMS.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path
from typing import Protocol, runtime_checkable

from mlplatform.errors import EncryptionKeyError

KEY_ENV = "MLPLATFORM_REGISTRY_KEY"
KEY_FILE_ENV = "MLPLATFORM_REGISTRY_KEY_FILE"
_NONCE_BYTES = 12


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


class LocalKey:
    """A 32-byte master key held in this process (from an env var, a file or code)."""

    __slots__ = ("_key", "_source", "key_id")

    def __init__(self, key: bytes, source: str = "a key given in code") -> None:
        if not isinstance(key, bytes) or len(key) != 32:
            got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
            raise EncryptionKeyError(
                f"Got {got} from {source}; an AES-256 key must be exactly 32 bytes. "
                f"Create one with `python -c 'from mlplatform.registry import generate_key; "
                f"print(generate_key())'`."
            )
        self._key = key
        self._source = source
        # Derived, not the key itself: safe to store in manifests and show in errors.
        digest = hashlib.sha256(b"mlplatform-registry-key-id\0" + key).hexdigest()
        self.key_id = f"local:{digest[:16]}"

    def __repr__(self) -> str:  # never print the key
        return f"LocalKey(key_id={self.key_id!r}, source={self._source!r})"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(_NONCE_BYTES)
        return nonce + AESGCM(self._key).encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return AESGCM(self._key).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], context)


def generate_key() -> str:
    """A new random 256-bit key, base64-encoded, for MLPLATFORM_REGISTRY_KEY or a key file."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def key_from_env(var: str = KEY_ENV) -> LocalKey:
    """Read a master key (base64 or hex of 32 bytes) from environment variable `var`."""
    text = os.environ.get(var)
    if not text:
        raise EncryptionKeyError(
            f"Environment variable {var} is not set or empty; set it to the base64 or hex of "
            f"a 32-byte key (see generate_key())."
        )
    return LocalKey(_decode(text, f"environment variable {var}"), f"environment variable {var}")


def key_from_file(path: str | os.PathLike[str]) -> LocalKey:
    """Read a master key from a file: base64 or hex text of 32 bytes, or 32 raw bytes."""
    source = f"key file {path}"
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise EncryptionKeyError(
            f"Cannot read {source} ({e.strerror}); check the path given as `key_file` or "
            f"{KEY_FILE_ENV}."
        ) from None
    try:
        return LocalKey(_decode(raw.decode("ascii"), source), source)
    except (UnicodeDecodeError, EncryptionKeyError):
        if len(raw) == 32:
            return LocalKey(raw, source)
        raise


def default_key() -> KeyProvider | None:
    """The key from MLPLATFORM_REGISTRY_KEY, else from MLPLATFORM_REGISTRY_KEY_FILE, else None."""
    if os.environ.get(KEY_ENV):
        return key_from_env(KEY_ENV)
    if os.environ.get(KEY_FILE_ENV):
        return key_from_file(os.environ[KEY_FILE_ENV])
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


def _decode(text: str, source: str) -> bytes:
    text = text.strip()
    try:
        if len(text) == 64:
            return bytes.fromhex(text)
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise EncryptionKeyError(
            f"The key in {source} is neither 64 hex digits nor base64 of 32 bytes; "
            f"create one with generate_key()."
        ) from None
