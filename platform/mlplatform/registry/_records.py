"""Frozen values the registry hands out, and their JSON form on disk.

A version's manifest.json is `Version` minus its storage location, plus the
encryption header; index.json holds version summaries, aliases and alias history.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

MANIFEST_FORMAT = 1
INDEX_FORMAT = 1


@dataclass(frozen=True)
class FileEntry:
    """One file of a version: plaintext hash and size, and those of the bytes as stored."""

    path: str  # relative to the version's files/ directory, '/'-separated
    size: int
    sha256: str
    # Equal to size/sha256 unless encrypted; lets anyone detect tampering without the key.
    stored_size: int
    stored_sha256: str


@dataclass(frozen=True)
class Lineage:
    """Where a version came from: the training run, its data, and where it was stored.

    `classification` (residency) follows lineage: a version is never classified lower than its
    artifact's metadata.json or, for an export, than its source version. `training_regions` and
    `training_node_ids` say where the training ran; where the version is stored is `Version.uri`
    (and `storage_region`). Versions registered before these fields read them as None / [].
    """

    spec: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    dataset_fingerprint: str | None = None
    job_id: str | None = None
    storage_region: str | None = None
    model_ref: str | None = None
    input_signature: Any = None
    source_uri: str | None = None
    classification: str | None = None
    training_regions: list[str] = field(default_factory=list)
    training_node_ids: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Encryption:
    """How a version's files are encrypted; holds no secret (the data key is wrapped)."""

    algorithm: str
    key_id: str
    wrapped_key: str  # base64 of the data key wrapped by the KeyProvider
    chunk_bytes: int


@dataclass(frozen=True)
class Version:
    """An immutable registered model version."""

    name: str
    version: int
    registered_at: str
    registered_by: str
    files: tuple[FileEntry, ...]
    lineage: Lineage
    encryption: Encryption | None
    uri: str  # where the version's files live

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None


@dataclass(frozen=True)
class AliasMove:
    """One change of an alias: who moved it, when, from which version to which, and why."""

    alias: str
    from_version: int | None
    to_version: int
    actor: str
    at: str
    action: str  # "set", "promote" or "rollback"
    reason: str | None = None
    source_alias: str | None = None  # for "promote": the alias whose target was copied


@dataclass(frozen=True)
class FileProblem:
    """A stored file that does not match its manifest entry."""

    path: str
    kind: str  # "missing", "unexpected", "size", "sha256", "authentication"
    detail: str


@dataclass(frozen=True)
class VerifyReport:
    """Result of checking a version's stored files against its manifest."""

    ref: str
    files_checked: int
    problems: tuple[FileProblem, ...]
    plaintext_checked: bool  # False for an encrypted version checked without its key

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class VersionDiff:
    """Differences between two versions; each changed key maps to (value in a, value in b)."""

    name: str
    a: int
    b: int
    metrics: dict[str, tuple[Any, Any]]
    spec: dict[str, tuple[Any, Any]]
    lineage: dict[str, tuple[Any, Any]]
    files_added: tuple[str, ...]
    files_removed: tuple[str, ...]
    files_changed: tuple[str, ...]


# An encrypted version's lineage is sealed too (spec, metrics, data fingerprint, signature, sources):
# it describes restricted data. Only what residency enforcement and audits must read without the
# key stays in the clear: the classification and where the version was trained and stored.
SEALED_LINEAGE = ("spec", "metrics", "dataset_fingerprint", "job_id", "model_ref", "input_signature",
                  "source_uri", "extra")
SEALED_KEY = "sealed"


def manifest_to_json(version: Version, data_key: bytes | None = None) -> dict[str, Any]:
    """The manifest; with `data_key` (an encrypted version's), its lineage details are sealed under it."""
    data = asdict(version)
    data.pop("uri")
    data["files"] = [asdict(f) for f in version.files]
    if data_key is not None:
        lineage = data["lineage"]
        secret = json.dumps({k: lineage.pop(k) for k in SEALED_LINEAGE}, sort_keys=True).encode()
        lineage[SEALED_KEY] = _seal(data_key, version.name, secret)
    return {"format": MANIFEST_FORMAT, **data}


def manifest_from_json(data: dict[str, Any], uri: str) -> Version:
    """The version a manifest describes; sealed lineage is opened with the registry's default key.

    Without that key the sealed fields read as their empty defaults (a reader without the key sees
    that the version exists, its files' hashes and its classification, not its lineage).
    """
    lineage_keys = {f.name for f in fields(Lineage)}
    enc = data.get("encryption")
    lineage = dict(data["lineage"])
    if SEALED_KEY in lineage and enc:
        lineage.update(_open_sealed(data["name"], Encryption(**enc), lineage.pop(SEALED_KEY)))
    return Version(
        name=data["name"],
        version=int(data["version"]),
        registered_at=data["registered_at"],
        registered_by=data["registered_by"],
        files=tuple(FileEntry(**f) for f in data["files"]),
        lineage=Lineage(**{k: v for k, v in lineage.items() if k in lineage_keys}),
        encryption=Encryption(**enc) if enc else None,
        uri=uri,
    )


def _aad(name: str) -> bytes:
    return b"mlplatform-registry-lineage/v1\0" + name.encode()


def _seal(data_key: bytes, name: str, plain: bytes) -> str:
    import base64
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return base64.b64encode(nonce + AESGCM(data_key).encrypt(nonce, plain, _aad(name))).decode()


def _open_sealed(name: str, enc: Encryption, sealed: str) -> dict[str, Any]:
    import base64

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from mlplatform.registry._keys import default_key

    provider = default_key()
    if provider is None:
        return {}
    try:
        data_key = provider.unwrap(base64.b64decode(enc.wrapped_key), name.encode())
        raw = base64.b64decode(sealed)
        return json.loads(AESGCM(data_key).decrypt(raw[:12], raw[12:], _aad(name)))
    except Exception:  # not this key (another cluster's): the lineage stays sealed, as without a key
        return {}


def move_to_json(move: AliasMove) -> dict[str, Any]:
    return asdict(move)


def move_from_json(data: dict[str, Any]) -> AliasMove:
    return AliasMove(**data)
