"""AES-256-GCM file encryption in chunks, so multi-GB weights never sit whole in memory.

Stored file = chunks of nonce (12 random bytes) || ciphertext || tag (16 bytes).
Each chunk's associated data binds the file's relative path, the chunk's index and
whether it is the last chunk: files cannot be swapped, chunks cannot be reordered,
and a truncated file fails authentication.
"""

from __future__ import annotations

import os
import struct

ALGORITHM = "AES-256-GCM"
CHUNK_BYTES = 8 * 1024 * 1024
NONCE_BYTES = 12
TAG_BYTES = 16


def _aad(relpath: str, index: int, is_last: bool) -> bytes:
    position = struct.pack(">Q?", index, is_last)
    return b"mlplatform-registry/v1\0" + relpath.encode() + b"\0" + position


def encrypt_chunk(data_key: bytes, relpath: str, index: int, is_last: bool, plain: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(data_key).encrypt(nonce, plain, _aad(relpath, index, is_last))


def decrypt_chunk(data_key: bytes, relpath: str, index: int, is_last: bool, stored: bytes) -> bytes:
    """Raises cryptography's InvalidTag if the chunk was modified, moved or truncated."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aad = _aad(relpath, index, is_last)
    return AESGCM(data_key).decrypt(stored[:NONCE_BYTES], stored[NONCE_BYTES:], aad)
