"""Envelope encryption of restricted artifacts (checkpoints, drift samples, exported models).

Each file gets a fresh random 256-bit data key; the file's bytes are AES-256-GCM in chunks
under that key, and only the data key wrapped by the cluster's key (see keyring.py) is stored,
in a small header. Rotating the cluster's key re-wraps headers; the chunks are never touched.

File format:
    MAGIC (8 bytes) | header length (4 bytes, big-endian) | header (JSON) | chunks
    header = {algorithm, key_id, wrapped_key (base64), chunk_bytes}
    chunk  = nonce (12) | ciphertext | tag (16)

Binding: the data key is wrapped with the file's `context` (its path relative to the artifact
directory) as associated data, and every chunk's associated data holds the context, its index
and whether it is the last: a file swapped for another, reordered or truncated fails to open.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from mlplatform.errors import IntegrityError

if TYPE_CHECKING:
    from mlplatform._internal.keyring import Keyring

MAGIC = b"MLPENC1\0"
ALGORITHM = "AES-256-GCM"
CHUNK_BYTES = 4 * 1024 * 1024
_NONCE, _TAG = 12, 16
_MAX_HEADER = 64 * 1024


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is an envelope-encrypted file (starts with the magic bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def encrypt_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], keyring: Keyring, context: str) -> None:
    """Write `src` encrypted to `dst` (a new data key, wrapped by the keyring's current key)."""
    data_key = os.urandom(32)
    key_id, wrapped = keyring.seal_key(data_key, _key_aad(context))
    header = json.dumps({"algorithm": ALGORITHM, "key_id": key_id, "chunk_bytes": CHUNK_BYTES, "context": context,
                         "wrapped_key": base64.b64encode(wrapped).decode()}, sort_keys=True).encode()
    with open(src, "rb") as source, _atomic(dst) as out:
        out.write(MAGIC + struct.pack(">I", len(header)) + header)
        for index, data, last in chunks(source, CHUNK_BYTES):
            out.write(_seal(data_key, context, index, last, data))


def decrypt_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], keyring: Keyring, context: str) -> None:
    """Write the plaintext of the envelope file `src` to `dst`; refuse a tampered file naming it."""
    with open(src, "rb") as source, _atomic(dst) as out:
        for part in _open(source, src, keyring, context):
            out.write(part)


def decrypt_bytes(src: str | os.PathLike[str], keyring: Keyring, context: str) -> bytes:
    """The plaintext of the envelope file `src`, in memory (for a model session built from bytes)."""
    with open(src, "rb") as source:
        return b"".join(_open(source, src, keyring, context))


def rewrap(path: str | os.PathLike[str], keyring: Keyring) -> bool:
    """Re-wrap `path`'s data key under the keyring's current key; chunks are copied, not re-encrypted.

    Returns False if it was already wrapped by the current key.
    """
    with open(path, "rb") as f:
        header, offset = _header(f, path)
        if header["key_id"] == keyring.current_id:
            return False
        # The context in the header is not trusted: a wrong one fails the unwrap below.
        context = header["context"]
        data_key = keyring.open_key(header["key_id"], _wrapped(header), _key_aad(context), path)
        key_id, wrapped = keyring.seal_key(data_key, _key_aad(context))
        new = dict(header, key_id=key_id, wrapped_key=base64.b64encode(wrapped).decode())
        raw = json.dumps(new, sort_keys=True).encode()
        with _atomic(path) as out:
            out.write(MAGIC + struct.pack(">I", len(raw)) + raw)
            f.seek(offset)
            shutil.copyfileobj(f, out, 1024 * 1024)
    return True


def encrypt_tree(directory: str | os.PathLike[str], keyring: Keyring) -> int:
    """Encrypt every regular file below `directory` in place; the number encrypted.

    Each file's context is its '/'-separated path relative to `directory`, which stays the same
    when the directory is uploaded or copied elsewhere whole (as Ray Train does with checkpoints).
    """
    base = Path(directory)
    count = 0
    for path in sorted(base.rglob("*")):
        if path.is_symlink() or not path.is_file() or is_encrypted(path):
            continue
        encrypt_file(path, path, keyring, path.relative_to(base).as_posix())
        count += 1
    return count


def decrypt_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str], keyring: Keyring,
                 plain_ok: tuple[str, ...] = ()) -> int:
    """Copy the tree `src` to `dst`, decrypting every file (contexts as in encrypt_tree); how many.

    A plaintext file is refused unless its name starts with one of `plain_ok`: in an encrypted
    tree it can only be a file put there by someone without the key (say, a crafted pickle).
    """
    base, out = Path(src), Path(dst)
    count = 0
    for path in sorted(base.rglob("*")):
        if path.is_symlink():
            raise IntegrityError(
                f"{path} is a symbolic link inside an encrypted artifact; the platform never writes one. "
                f"Remove it and restore the original file."
            )
        if not path.is_file():
            continue
        rel = path.relative_to(base)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if is_encrypted(path):
            decrypt_file(path, out / rel, keyring, rel.as_posix())
            count += 1
        elif path.name.startswith(plain_ok) and plain_ok:
            shutil.copyfile(path, out / rel)
        else:
            raise IntegrityError(
                f"{path} is not encrypted, but it belongs to an encrypted artifact of restricted data: it was "
                f"written before encryption was on or put there by someone without the key. Refusing to load "
                f"it; delete that directory (an older checkpoint is used instead) or restore the file."
            )
    return count


# ---------------------------------------------------------------- internals


def _key_aad(context: str | None) -> bytes:
    return b"mlplatform-envelope-key/v1\0" + (context or "").encode()


def _chunk_aad(context: str, index: int, last: bool) -> bytes:
    return b"mlplatform-envelope/v1\0" + context.encode() + b"\0" + struct.pack(">Q?", index, last)


def _seal(data_key: bytes, context: str, index: int, last: bool, plain: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(data_key).encrypt(nonce, plain, _chunk_aad(context, index, last))


def _header(f: BinaryIO, path: str | os.PathLike[str]) -> tuple[dict, int]:
    head = f.read(len(MAGIC) + 4)
    if head[: len(MAGIC)] != MAGIC or len(head) < len(MAGIC) + 4:
        raise IntegrityError(
            f"{path} is not an mlplatform encrypted file (no envelope header): it was replaced or "
            f"truncated. Restore it from a good copy, or take the checkpoint/export again."
        )
    (size,) = struct.unpack(">I", head[len(MAGIC):])
    try:
        if size > _MAX_HEADER:
            raise ValueError("header too large")
        header = json.loads(f.read(size))
        if not {"algorithm", "key_id", "wrapped_key", "chunk_bytes", "context"} <= set(header):
            raise ValueError("fields missing")
        if header["algorithm"] != ALGORITHM or not 0 < int(header["chunk_bytes"]) <= 64 * 2**20:
            raise ValueError("unknown algorithm or chunk size")
    except (ValueError, TypeError) as e:
        raise IntegrityError(
            f"{path}: its encryption header is damaged ({e}); the file was modified. Restore it from a "
            f"good copy, or take the checkpoint/export again."
        ) from None
    return header, len(MAGIC) + 4 + size


def _open(f: BinaryIO, path: str | os.PathLike[str], keyring: Keyring, context: str) -> Iterator[bytes]:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header, _ = _header(f, path)
    if header["context"] != context:
        raise IntegrityError(
            f"{path} was encrypted as {header['context']!r}, not {context!r}: it was moved or swapped with "
            f"another file. Refusing to load it; restore the original file to its place."
        )
    data_key = keyring.open_key(header["key_id"], _wrapped(header), _key_aad(context), path)
    aead = AESGCM(data_key)
    size = int(header["chunk_bytes"]) + _NONCE + _TAG
    index = 0
    current = read_exact(f, size)
    while True:
        following = read_exact(f, size) if len(current) == size else b""
        last = not following
        try:
            yield aead.decrypt(current[:_NONCE], current[_NONCE:], _chunk_aad(context, index, last))
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"{path}: chunk {index} fails authentication: the file was modified, truncated, or moved "
                f"from another place (it was encrypted as {context!r}). Refusing to load it; restore it "
                f"from a good copy, or take the checkpoint/export again."
            ) from None
        if last:
            return
        current, index = following, index + 1


def _wrapped(header: dict) -> bytes:
    try:
        return base64.b64decode(header["wrapped_key"], validate=True)
    except (ValueError, TypeError):
        return b""  # fails the unwrap, which names the file


def read_exact(stream: BinaryIO, n: int) -> bytes:
    """Read up to `n` bytes, short only at end of stream (some streams return less)."""
    parts, got = [], 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def chunks(stream: BinaryIO, size: int) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (index, data, is_last); an empty stream yields one empty last chunk."""
    current, index = read_exact(stream, size), 0
    while True:
        following = read_exact(stream, size) if len(current) == size else b""
        yield index, current, not following
        if not following:
            return
        current, index = following, index + 1


class _atomic:
    """A temporary file beside `path`, renamed over it on success (so src may equal dst)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __enter__(self) -> BinaryIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, kind, *_) -> None:
        self.f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            Path(self.tmp).unlink(missing_ok=True)

