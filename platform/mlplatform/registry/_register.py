"""register(): copy an artifact directory into the registry as the model's next version.

Files are copied (and encrypted) into a private staging directory without holding any
lock; only choosing the version number, moving the staged directory into place and
recording the version in the index happen in the index's transaction (which holds the
model's row lock), so concurrent registrations serialize only on that short step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from mlplatform import access, residency
from mlplatform._internal import keyring, storage
from mlplatform.errors import ArtifactError, EncryptionKeyError, ModelNotFound, RegistryError, ResidencyError

from mlplatform.registry import _lineage
from mlplatform._internal.envelope import chunks
from mlplatform.registry._crypto import ALGORITHM, CHUNK_BYTES, encrypt_chunk
from mlplatform.registry._index import Index, database, read_index, refuse_unmigrated, update_index, version_numbers
from mlplatform.registry._keys import KeyProvider, as_provider
from mlplatform.registry._names import check_name
from mlplatform.registry._records import Encryption, FileEntry, Lineage, Version, manifest_to_json
from mlplatform.registry._store import Store, staging_token


def check_writable(root: str | os.PathLike[str] | None = None, name: str | None = None) -> None:
    """Raise RegistryNotWritable now unless a version (of model `name`, if given) could be registered under `root`.

    For callers that do minutes of work before registering (export), so they fail first.
    """
    if name is not None:
        check_name(name)
    store = Store(root)
    storage.check_write(store.display, "root")  # a confinement in force (residency) refuses it first
    store.ensure_writable(name)
    database(store)  # reachable, and its schema current


def register(
    artifact_dir: str | os.PathLike[str],
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    lineage: Mapping[str, Any] | None = None,
    encrypt_key: KeyProvider | bytes | str | None = None,
    actor: str | None = None,
) -> Version:
    """Copy `artifact_dir` into the registry as the next version of `name`, with lineage and hashes.

    Args:
        artifact_dir: local path or URI of the training artifact; its metadata.json, if
            present, supplies spec, metrics, dataset_fingerprint, input_signature, model_ref.
        lineage: overrides for those fields (and job_id, storage_region, classification,
            training_regions, training_node_ids, extra). `classification` may keep or raise
            the artifact's, never lower it.
        encrypt_key: encrypt the files at rest with AES-256-GCM under this key
            (a KeyProvider such as key_from_env(), 32 bytes, or base64/hex text).
        actor: who registers; defaults to the OS user.

    Under the cluster's residency policy the version's classification decides where its
    files may be stored: a `root` outside its storage prefixes is refused before a byte is
    written. Each registration is recorded in the cluster's audit trail.

    Raises:
        InvalidName, ArtifactError, RegistryNotWritable, EncryptionKeyError, RegistryLockTimeout,
        ResidencyError (classification lowered or unknown, `root` outside its storage prefixes).
    """
    check_name(name)
    access.require("registry.register", f"registry:{name}")
    provider = as_provider(encrypt_key, "encrypt_key")
    store = Store(root)
    src_fs, src_dir, src_uri, listing = _open_artifact(artifact_dir)
    metadata = None
    if _lineage.METADATA_FILE in listing:
        path = f"{src_dir}/{_lineage.METADATA_FILE}"
        metadata = _lineage.read_metadata(
            _read_source(src_fs, path, src_uri), f"{src_uri}/{_lineage.METADATA_FILE}"
        )
    policy = residency.current()
    try:
        lineage_ = _lineage.build(metadata, lineage, src_uri, store.fs, policy)
        restricted = keyring.restricted(policy, lineage_.classification)
        if provider is None and restricted:
            # Restricted data is encrypted at rest whatever the caller passed: with the cluster's key.
            provider = keyring.cluster_keyring()
        with residency.confined(policy, lineage_.classification):
            # Before the writability probe and the embedded database: both write under `root`.
            storage.check_write(store.display, "root")
            version = _register(store, name, listing, src_fs, src_dir, src_uri, lineage_, provider, actor,
                                seal_lineage=restricted)
    except ResidencyError as e:
        residency.record("denial", what="register", model=name, source=src_uri, reason=str(e))
        raise
    residency.record(
        "artifact", what="register", registry=store.display, model=name, version=version.version, uri=version.uri,
        classification=lineage_.classification, storage_region=lineage_.storage_region,
        training_regions=lineage_.training_regions, training_node_ids=lineage_.training_node_ids,
        job_id=lineage_.job_id, source=src_uri,
    )
    return version


def _register(store: Store, name: str, listing: dict[str, int], src_fs: Any, src_dir: str, src_uri: str,
              lineage_: Lineage, provider: KeyProvider | None, actor: str | None,
              seal_lineage: bool = False) -> Version:
    """The copy and the index transaction of register(), under the caller's confinement."""
    data_key, encryption = None, None
    if provider is not None:
        data_key = os.urandom(32)  # a fresh data key per version; only its wrapped form is stored
        try:
            wrapped = provider.wrap(data_key, name.encode())
        except Exception as e:  # a KMS provider can fail in many ways; report which key
            raise EncryptionKeyError(
                f"Key provider {provider.key_id!r} (`encrypt_key`) could not wrap the data key "
                f"for model {name!r}: {e}. Nothing was written."
            ) from None
        encryption = Encryption(
            algorithm=ALGORITHM,
            key_id=provider.key_id,
            wrapped_key=base64.b64encode(wrapped).decode(),
            chunk_bytes=CHUNK_BYTES,
        )
    store.ensure_writable(name)
    database(store)  # fail before copying anything if the index cannot be reached
    refuse_unmigrated(store, name)

    staging = store.path(name, ".staging", staging_token())
    placed: list[int] = []  # the version number, once its directory is moved into place
    try:
        entries = tuple(
            _copy_file(src_fs, src_dir, src_uri, store, f"{staging}/files/{rel}", rel, data_key)
            for rel in sorted(listing)
        )

        def commit(index: Index) -> Version:
            # Directories count too: one left by a crash between move and index write
            # is invisible but its number must not be reused.
            on_disk = store.list_dirs(store.path(name, "versions"))
            taken = version_numbers(index) + [int(d) for d in on_disk if d.isdigit()]
            number = max(taken, default=0) + 1
            version = Version(
                name=name,
                version=number,
                registered_at=_lineage.now(),
                registered_by=_lineage.current_user(actor),
                files=entries,
                lineage=lineage_,
                encryption=encryption,
                uri=store.uri(store.files_dir(name, number)),
            )
            manifest = json.dumps(manifest_to_json(version, data_key if seal_lineage else None), indent=1).encode()
            with store.open_output(f"{staging}/manifest.json") as f:
                f.write(manifest)
            store.move(staging, store.version_dir(name, number))
            placed.append(number)
            index["versions"].append({
                "version": number,
                "registered_at": version.registered_at,
                "registered_by": version.registered_by,
                "encrypted": encryption is not None,
                "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            })
            return version

        return update_index(store, name, commit, create=True)
    except BaseException:
        # Not listed in the index, so never visible; remove the bytes anyway.
        if store.exists(staging):
            store.delete_quietly(staging)
        for number in placed:
            if not _listed(store, name, number):
                store.delete_quietly(store.version_dir(name, number))
        raise


def _listed(store: Store, name: str, number: int) -> bool:
    """Whether the index lists the version; when unsure, say yes so nothing listed is deleted."""
    try:
        return number in version_numbers(read_index(store, name))
    except ModelNotFound:
        return False
    except RegistryError:
        return True


def _open_artifact(artifact_dir: str | os.PathLike[str]) -> tuple[Any, str, str, dict[str, int]]:
    """(filesystem, path, display uri, {relpath: size}) of a non-empty artifact directory."""
    import pyarrow.fs as pafs

    text = storage.absolute(artifact_dir)
    fs, path = storage.filesystem(text, "artifact_dir", ArtifactError)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise ArtifactError(
            f"Got {text!r} for `artifact_dir`; it does not exist. Pass the directory the "
            f"training job wrote its artifact to (it holds model weights and metadata.json)."
        )
    if kind != pafs.FileType.Directory:
        raise ArtifactError(
            f"Got {text!r} for `artifact_dir`; it is a file, not a directory. Pass the "
            f"directory that contains it."
        )
    if isinstance(fs, pafs.LocalFileSystem):
        _refuse_escaping_links(path, text)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    base = path.rstrip("/") + "/"
    listing = {i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File}
    if not listing:
        raise ArtifactError(
            f"Got {text!r} for `artifact_dir`; it holds no files. Check that training "
            f"finished and wrote its artifact there."
        )
    return fs, path, text, listing


def _refuse_escaping_links(path: str, text: str) -> None:
    """Refuse a symbolic link in the artifact that leads outside it (say, to ~/.ssh or /etc).

    Registration follows links, so such a link would copy (and publish) a file that is no part of
    the artifact. Links that stay inside the directory are harmless and allowed.
    """
    top = os.path.realpath(path)
    for here, dirs, files in os.walk(path, followlinks=False):
        for entry in dirs + files:
            full = os.path.join(here, entry)
            if not os.path.islink(full):
                continue
            target = os.path.realpath(full)
            if os.path.commonpath([top, target]) != top:
                rel = os.path.relpath(full, path)
                raise ArtifactError(
                    f"{rel!r} in `artifact_dir` {text} is a symbolic link to {target}, outside the artifact; "
                    f"registering it would copy that file into the registry. Replace the link with the file "
                    f"itself (cp -L) or remove it. Nothing was written."
                )


def _read_source(fs: Any, path: str, src_uri: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except OSError as e:
        raise ArtifactError(
            f"Cannot read {path} in `artifact_dir` {src_uri}: {e.strerror or e}."
        ) from None


def _copy_file(
    src_fs: Any,
    src_dir: str,
    src_uri: str,
    store: Store,
    dst: str,
    rel: str,
    data_key: bytes | None,
) -> FileEntry:
    """Stream one file into staging, hashing the plaintext and the bytes as stored."""
    plain, stored = hashlib.sha256(), hashlib.sha256()
    size = stored_size = 0
    try:
        source = src_fs.open_input_stream(f"{src_dir}/{rel}")
    except OSError as e:
        raise ArtifactError(
            f"Cannot read {rel} in `artifact_dir` {src_uri}: {e.strerror or e}."
        ) from None
    with source, store.open_output(dst) as out:
        for index, data, last in chunks(source, CHUNK_BYTES):
            plain.update(data)
            size += len(data)
            if data_key is not None:
                data = encrypt_chunk(data_key, rel, index, last, data)
            stored.update(data)
            stored_size += len(data)
            out.write(data)
    return FileEntry(rel, size, plain.hexdigest(), stored_size, stored.hexdigest())
