"""Local master keys: 32 bytes from an environment variable, a key file or code, never shown.

Shared by the registry (its `encrypt_key`/`key`) and the cluster keyring (keyring.py), which wraps
the data keys of restricted artifacts. A KMS plugs in through registry.KeyProvider instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path

from mlplatform.errors import EncryptionKeyError

KEY_ENV = "MLPLATFORM_REGISTRY_KEY"
KEY_FILE_ENV = "MLPLATFORM_REGISTRY_KEY_FILE"
_NONCE_BYTES = 12


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
