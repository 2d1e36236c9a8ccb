"""verify() and fetch(): every stored file is checked against the manifest before use.

fetch() writes into a hidden sibling of the destination and renames it into place only
after every file has passed, so a refused version leaves nothing behind.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from mlplatform._internal import storage
from mlplatform.errors import EncryptionKeyError, IntegrityError, RegistryError

from mlplatform._internal.envelope import chunks
from mlplatform.registry._crypto import CHUNK_BYTES, NONCE_BYTES, TAG_BYTES, decrypt_chunk
from mlplatform.registry._index import load_version, read_index, select
from mlplatform.registry._keys import KEY_ENV, KEY_FILE_ENV, KeyProvider, as_provider, default_key
from mlplatform.registry._names import parse_ref
from mlplatform.registry._records import FileEntry, FileProblem, VerifyReport, Version
from mlplatform.registry._store import Store

_MAX_LISTED = 10


def verify(
    ref: str,
    *,
    root: str | os.PathLike[str] | None = None,
    key: KeyProvider | bytes | str | None = None,
) -> VerifyReport:
    """Check a version's stored files against its manifest, without handing them over.

    Without `key`, an encrypted version's ciphertext hashes are checked (tampering shows
    without the key); with it, every file is also decrypted and its plaintext hash checked.
    """
    store, version = _locate(ref, root)
    provider = as_provider(key, "key")
    data_key = _data_key(version, provider) if provider and version.encrypted else None
    problems = _listing_problems(store, version)
    absent = {p.path for p in problems}
    for entry in version.files:
        if entry.path not in absent:
            problem = _check_file(store, version, entry, data_key, None)
            if problem:
                problems.append(problem)
    return VerifyReport(
        ref=version.ref,
        files_checked=len(version.files),
        problems=tuple(problems),
        plaintext_checked=not version.encrypted or data_key is not None,
    )


def fetch(
    ref: str,
    dest_dir: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    key: KeyProvider | bytes | str | None = None,
) -> Version:
    """Copy a version's files into local `dest_dir` (new or empty) after verifying every hash.

    An encrypted version is decrypted with `key`, else with MLPLATFORM_REGISTRY_KEY or
    MLPLATFORM_REGISTRY_KEY_FILE.

    Raises:
        IntegrityError: a file is modified, missing, truncated or unexpected; nothing is copied.
        EncryptionKeyError: no key or the wrong key for an encrypted version.
    """
    store, version = _locate(ref, root)
    dest = Path(dest_dir).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise RegistryError(
            f"Got {str(dest)!r} for `dest_dir`; it exists and is not an empty directory. "
            f"Pass a new or empty directory so no stale file mixes with {version.ref}."
        )
    for entry in version.files:
        _check_relpath(version, entry.path)
    problems = _listing_problems(store, version)
    if problems:
        raise IntegrityError(_refusal(version, problems, dest))
    data_key = None
    if version.encrypted:
        provider = as_provider(key, "key") or default_key()
        if provider is None:
            raise EncryptionKeyError(
                f"Model {version.name!r} version {version.version} is encrypted and no key was "
                f"given. Pass `key`, or set {KEY_ENV} (base64 or hex of the 32-byte key) or "
                f"{KEY_FILE_ENV}. Nothing was copied to {dest}."
            )
        data_key = _data_key(version, provider)

    partial = storage.staging_dir(dest)  # refused here, before a byte, where a confinement forbids `dest`
    try:
        for entry in version.files:
            with storage.open_output(partial / entry.path) as sink:
                problem = _check_file(store, version, entry, data_key, sink)
            if problem:
                problems.append(problem)
        if problems:
            raise IntegrityError(_refusal(version, problems, dest))
        storage.replace_dir(partial, dest)  # `dest` is new or empty, checked above
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return version


def read_verified(
    ref: str,
    *,
    root: str | os.PathLike[str] | None = None,
    key: KeyProvider | bytes | str | None = None,
) -> tuple[Version, dict[str, bytes]]:
    """A version's files in memory, every hash verified and decrypted: plaintext never touches disk.

    For serving restricted (encrypted) versions. Keys as in fetch(); same errors as fetch().
    """
    import io

    store, version = _locate(ref, root)
    for entry in version.files:
        _check_relpath(version, entry.path)
    problems = _listing_problems(store, version)
    data_key = None
    if not problems and version.encrypted:
        provider = as_provider(key, "key") or default_key()
        if provider is None:
            raise EncryptionKeyError(
                f"Model {version.name!r} version {version.version} is encrypted and no key was "
                f"given. Pass `key`, or set {KEY_ENV} (base64 or hex of the 32-byte key) or {KEY_FILE_ENV}."
            )
        data_key = _data_key(version, provider)
    files: dict[str, bytes] = {}
    for entry in version.files if not problems else ():
        sink = io.BytesIO()
        problem = _check_file(store, version, entry, data_key, sink)
        if problem:
            problems.append(problem)
        files[entry.path] = sink.getvalue()
    if problems:
        raise IntegrityError(_refusal(version, problems, Path("(memory)")))
    return version, files


def _locate(ref: str, root: str | os.PathLike[str] | None) -> tuple[Store, Version]:
    name, selector = parse_ref(ref)
    store = Store(root)
    index = read_index(store, name)
    return store, load_version(store, index, select(index, selector, "ref"))


def _data_key(version: Version, provider: KeyProvider) -> bytes:
    assert version.encryption is not None
    enc = version.encryption
    try:
        data_key = provider.unwrap(base64.b64decode(enc.wrapped_key), version.name.encode())
    except Exception:  # InvalidTag for a local key; a KMS raises its own types
        data_key = None
    if not isinstance(data_key, bytes) or len(data_key) != 32:
        raise EncryptionKeyError(
            f"Wrong key for model {version.name!r} version {version.version}: the key given "
            f"({provider.key_id}) cannot decrypt it; it was encrypted with {enc.key_id}. Pass "
            f"that key as `key` or in {KEY_ENV}. Nothing was copied."
        )
    return data_key


def _listing_problems(store: Store, version: Version) -> list[FileProblem]:
    """Files the manifest lists that are gone, and files present that it does not list."""
    actual = store.list_files(store.path(version.name, "versions", version.version, "files")) or {}
    expected = {f.path for f in version.files}
    problems = [FileProblem(p, "missing", "missing") for p in sorted(expected - set(actual))]
    problems += [
        FileProblem(p, "unexpected", "present but not in the manifest (added after registration)")
        for p in sorted(set(actual) - expected)
    ]
    return problems


def _check_file(
    store: Store,
    version: Version,
    entry: FileEntry,
    data_key: bytes | None,
    sink: BinaryIO | None,
) -> FileProblem | None:
    """Stream one stored file, hashing it (and decrypting it when `data_key` is given)."""
    stored_hash, plain_hash = hashlib.sha256(), hashlib.sha256()
    stored_size = plain_size = 0
    failed_chunk: int | None = None
    enc = version.encryption
    size = enc.chunk_bytes + NONCE_BYTES + TAG_BYTES if enc else CHUNK_BYTES
    path = store.path(version.name, "versions", version.version, "files", entry.path)
    try:
        source = store.open_input(path)
    except FileNotFoundError:
        return FileProblem(entry.path, "missing", "missing")
    with source:
        for index, data, last in chunks(source, size):
            stored_hash.update(data)
            stored_size += len(data)
            if enc is not None:
                if data_key is None or failed_chunk is not None:
                    continue
                from cryptography.exceptions import InvalidTag

                try:
                    data = decrypt_chunk(data_key, entry.path, index, last, data)
                except InvalidTag:
                    failed_chunk = index
                    continue
            plain_hash.update(data)
            plain_size += len(data)
            if sink is not None:
                sink.write(data)
    if stored_size != entry.stored_size:
        return FileProblem(
            entry.path, "size",
            f"is {stored_size} bytes, the manifest records {entry.stored_size} "
            f"(truncated or extended)",
        )
    if stored_hash.hexdigest() != entry.stored_sha256:
        return FileProblem(
            entry.path, "sha256",
            f"sha256 {stored_hash.hexdigest()[:12]}... differs from the recorded "
            f"{entry.stored_sha256[:12]}... (modified after registration)",
        )
    if failed_chunk is not None:
        return FileProblem(
            entry.path, "authentication",
            f"failed AES-GCM authentication at chunk {failed_chunk} (modified or swapped)",
        )
    if (enc is None or data_key is not None) and plain_hash.hexdigest() != entry.sha256:
        return FileProblem(
            entry.path, "sha256",
            f"decrypted sha256 {plain_hash.hexdigest()[:12]}... differs from the recorded "
            f"{entry.sha256[:12]}...",
        )
    return None


def _check_relpath(version: Version, relpath: str) -> None:
    # The manifest is hash-checked against index.json, but both live in the same root:
    # never let a forged entry write outside the destination.
    parts = PurePosixPath(relpath).parts
    if not parts or relpath.startswith("/") or ".." in parts:
        raise IntegrityError(
            f"Model {version.name!r} version {version.version}: the manifest lists an unsafe "
            f"path {relpath!r}; the registry was changed outside mlplatform. Refusing to load it."
        )


def _refusal(version: Version, problems: list[FileProblem], dest: Path) -> str:
    listed = "; ".join(f"{p.path}: {p.detail}" for p in problems[:_MAX_LISTED])
    more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return (
        f"Model {version.name!r} version {version.version} in {version.uri} failed its integrity "
        f"check, so it was not loaded: {listed}{more}. Nothing was copied to {dest}. Restore the "
        f"files from a backup or register the artifact again; verify({version.ref!r}) reports "
        f"every problem."
    )
