"""A model's index (versions, aliases, alias history) in the metadata store, and selectors.

The index lives in a database, not beside the artifacts: SQLite at `<root>/registry.db` by
default, or the shared database MLPLATFORM_METADATA_URL names (PostgreSQL), which is what an
object-store root needs, since an object store has neither locks nor atomic rename. Every
change is one transaction that locks the model's row, so concurrent alias moves and
registrations from any number of processes and nodes serialise and none is lost.

Callers see the index as a plain dict (`Index`) and change it in place; `update_index` writes
back what changed. The alias history is append-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from mlplatform._internal import metadata
from mlplatform._internal.metadata import tables as t
from mlplatform.errors import (
    AliasNotFound,
    IntegrityError,
    ModelNotFound,
    RegistryError,
    RegistryLockTimeout,
    VersionNotFound,
)

from mlplatform.registry import _lineage
from mlplatform.registry._names import NAME_PATTERN, Selector
from mlplatform.registry._records import Version, manifest_from_json
from mlplatform.registry._store import Store

T = TypeVar("T")
Index = dict[str, Any]
DB_FILE = "registry.db"
FILE_INDEX = "index.json"  # the format before the metadata store; `mlplatform registry migrate` imports it
_MOVE_FIELDS = ("alias", "from_version", "to_version", "actor", "at", "action", "reason", "source_alias")
_VERSION_FIELDS = ("version", "registered_at", "registered_by", "encrypted", "manifest_sha256")
_log = logging.getLogger(__name__)


def database(store: Store, create: bool = True) -> Any:
    """The metadata store holding this root's index; None if `create` is off and the root has none
    yet (reading a registry that does not exist must not create one)."""
    url = metadata.configured_url()
    if url is None:
        if not store.local:
            raise RegistryError(
                f"Registry root {store.display} is on an object store, which cannot lock its index; it "
                f"needs a shared metadata database. Set {metadata.URL_ENV}=postgresql://user:"
                f"password@host:5432/dbname (the database the cluster's services use)."
            )
        if not create and not store.exists(store.path(DB_FILE)):
            return None
        url = metadata.sqlite_url(store.path(DB_FILE))
    try:
        return metadata.open_store(url)
    except metadata.MetadataStoreError as e:
        raise RegistryError(f"Registry root {store.display}: {e}") from None


def registry_key(store: Store) -> str:
    """Which registry a row belongs to. The embedded database sits inside its root and holds that
    root only, so its rows name no path and a root copied or moved elsewhere keeps its index; a
    shared database holds many roots, told apart by their URIs."""
    return store.display if metadata.configured_url() else "."


def model_names(store: Store) -> list[str]:
    """Names of the models under the root that were registered at least once."""
    engine = database(store, create=False)
    if engine is None:
        return []
    with _errors(), metadata.read_transaction(engine) as conn:
        names = conn.scalars(
            t.registry_models.select().with_only_columns(t.registry_models.c.name)
            .where(t.registry_models.c.registry == registry_key(store)).order_by(t.registry_models.c.name)
        ).all()
    unmigrated = sorted(set(file_indexed(store)) - set(names))
    if unmigrated:
        _log.warning("registry %s: %s %s still in the file-based format; run `mlplatform registry migrate "
                     "--root %s`", store.display, ", ".join(unmigrated),
                     "is" if len(unmigrated) == 1 else "are", store.display)
    return list(names)


def read_index(store: Store, name: str) -> Index:
    """The model's index; raises ModelNotFound if it was never registered."""
    engine = database(store, create=False)
    index = None
    if engine is not None:
        with _errors(), metadata.read_transaction(engine) as conn:
            index = _load(conn, store, name)
    if index is None:
        refuse_unmigrated(store, name)
        known = model_names(store)
        listing = ", ".join(known) if known else "none"
        raise ModelNotFound(
            f"No model {name!r} in registry {store.display}; registered models: {listing}. "
            f"Check `name` and `root`, or register it first with register(artifact_dir, {name!r})."
        )
    return index


def update_index(
    store: Store, name: str, change: Callable[[Index], T], *, create: bool = False
) -> T:
    """Apply `change` to the index in one transaction holding the model's row lock."""
    if not create:
        read_index(store, name)  # a clear ModelNotFound before anything is created
    engine = database(store)
    with _errors(), metadata.write_transaction(engine) as conn:
        if create:
            _insert_model(conn, engine, registry_key(store), name)
        index = _load(conn, store, name, lock=True)
        if index is None:
            raise ModelNotFound(f"Model {name!r} was removed from registry {store.display} meanwhile.")
        before_versions = set(version_numbers(index))
        before_aliases = dict(index["aliases"])
        before_moves = len(index["alias_history"])
        before_hashes = {v["version"]: v["manifest_sha256"] for v in index["versions"]}
        result = change(index)
        _write_changes(conn, registry_key(store), name, index, before_versions, before_aliases, before_moves)
        _write_rewrapped(conn, registry_key(store), name, index, before_hashes)
    return result


def _load(conn: Any, store: Store, name: str, lock: bool = False) -> Index | None:
    import sqlalchemy as sa

    key = (registry_key(store), name)
    query = sa.select(t.registry_models.c.name).where(
        t.registry_models.c.registry == key[0], t.registry_models.c.name == key[1])
    if lock:
        query = query.with_for_update()  # PostgreSQL row lock; SQLite already holds its write lock
    if conn.execute(query).first() is None:
        return None

    def rows(table: Any, order: Any) -> list[Any]:
        return conn.execute(
            sa.select(table).where(table.c.registry == key[0], table.c.name == key[1]).order_by(order)
        ).mappings().all()

    return {
        "name": name,
        "versions": [{f: r[f] for f in _VERSION_FIELDS} for r in rows(t.registry_versions, t.registry_versions.c.version)],
        "aliases": {r["alias"]: r["version"] for r in rows(t.registry_aliases, t.registry_aliases.c.alias)},
        "alias_history": [{f: r[f] for f in _MOVE_FIELDS}
                          for r in rows(t.registry_alias_moves, t.registry_alias_moves.c.seq)],
    }


def _insert_model(conn: Any, engine: Any, registry: str, name: str) -> None:
    if metadata.is_postgresql(engine):
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(insert(t.registry_models).values(registry=registry, name=name, created_at=_lineage.now())
                 .on_conflict_do_nothing())


def _write_changes(conn: Any, registry: str, name: str, index: Index, before_versions: set[int],
                   before_aliases: dict[str, int], before_moves: int) -> None:
    import sqlalchemy as sa

    key = {"registry": registry, "name": name}
    new_versions = [{**key, **{f: v[f] for f in _VERSION_FIELDS}}
                    for v in index["versions"] if v["version"] not in before_versions]
    if new_versions:
        conn.execute(t.registry_versions.insert(), new_versions)
    aliases = t.registry_aliases
    for alias, version in index["aliases"].items():
        if alias not in before_aliases:
            conn.execute(aliases.insert().values(**key, alias=alias, version=version))
        elif before_aliases[alias] != version:
            conn.execute(sa.update(aliases).where(aliases.c.registry == registry, aliases.c.name == name,
                                                  aliases.c.alias == alias).values(version=version))
    moves = index["alias_history"][before_moves:]
    if moves:
        conn.execute(t.registry_alias_moves.insert(), [{**key, **{f: m.get(f) for f in _MOVE_FIELDS}} for m in moves])


def _write_rewrapped(conn: Any, registry: str, name: str, index: Index, before: dict[int, str]) -> None:
    """Record the new manifest hash of versions whose data key was re-wrapped (key rotation)."""
    import sqlalchemy as sa

    versions = t.registry_versions
    for v in index["versions"]:
        if v["version"] in before and before[v["version"]] != v["manifest_sha256"]:
            conn.execute(sa.update(versions).where(versions.c.registry == registry, versions.c.name == name,
                                                   versions.c.version == v["version"])
                         .values(manifest_sha256=v["manifest_sha256"]))


def file_indexed(store: Store) -> list[str]:
    """Models under the root that still have a file-based index.json."""
    return sorted(d for d in store.list_dirs(store.root)
                  if NAME_PATTERN.match(d) and store.exists(store.path(d, FILE_INDEX)))


def refuse_unmigrated(store: Store, name: str) -> None:
    """A file-based model must be migrated first: registering beside it would hide its versions."""
    if store.exists(store.path(name, FILE_INDEX)) and not _known(store, name):
        raise RegistryError(
            f"Model {name!r} in registry {store.display} is still in the file-based format "
            f"({store.uri(store.path(name, FILE_INDEX))}). Import it into the metadata store once with "
            f"`mlplatform registry migrate --root {store.display}`; nothing is lost or changed."
        )


def _known(store: Store, name: str) -> bool:
    engine = database(store, create=False)
    if engine is None:
        return False
    with _errors(), metadata.read_transaction(engine) as conn:
        return _load(conn, store, name) is not None


class _errors:
    """Metadata-store failures as registry errors (a timed-out writer is RegistryLockTimeout)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, _tb: Any) -> bool:
        if isinstance(error, metadata.MetadataBusy):
            raise RegistryLockTimeout(
                f"{error} Another registration or alias change of this model is still running.") from None
        if isinstance(error, metadata.MetadataStoreError):
            raise RegistryError(str(error)) from None
        return False


def version_numbers(index: Index) -> list[int]:
    return [v["version"] for v in index["versions"]]


def select(index: Index, selector: Selector, field: str = "version") -> int:
    """The version number a selector (number, alias or None for latest) names."""
    name, numbers = index["name"], version_numbers(index)
    if not numbers:  # an index is only written with its first version; be safe anyway
        raise VersionNotFound(f"Model {name!r} has no versions yet; register one first.")
    if selector is None:
        return max(numbers)
    if isinstance(selector, int):
        if selector not in numbers:
            raise VersionNotFound(
                f"Got {selector} for `{field}`; model {name!r} has versions "
                f"{_span(numbers)} (latest {max(numbers)}). Pass one of them."
            )
        return selector
    aliases = index["aliases"]
    if selector not in aliases:
        known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
        raise AliasNotFound(
            f"Got {selector!r} for `{field}`; model {name!r} has no alias {selector!r} "
            f"(its aliases: {known}). Set it first with set_alias({name!r}, {selector!r}, version)."
        )
    return aliases[selector]


REWRAPPED_SUFFIX = ".rewrapped"


def load_version(store: Store, index: Index, number: int) -> Version:
    """Read a listed version's manifest, refusing one that changed since registration."""
    name = index["name"]
    entry = next(v for v in index["versions"] if v["version"] == number)
    path = store.path(name, "versions", number, "manifest.json")
    data = store.read_bytes(path)
    if data is None:
        raise IntegrityError(
            f"Model {name!r} version {number}: {store.uri(path)} is missing. The version's "
            f"files were deleted outside the registry; restore them from a backup."
        )
    if hashlib.sha256(data).hexdigest() != entry["manifest_sha256"]:
        # A key rotation records the re-wrapped manifest's hash, then renames it into place: a crash
        # between the two leaves it beside, where it is the one the index names.
        pending = store.read_bytes(path + REWRAPPED_SUFFIX)
        if pending is not None and hashlib.sha256(pending).hexdigest() == entry["manifest_sha256"]:
            data = pending
    if hashlib.sha256(data).hexdigest() != entry["manifest_sha256"]:
        raise IntegrityError(
            f"Model {name!r} version {number}: {store.uri(path)} was modified after "
            f"registration (its sha256 no longer matches the registry's record). Do not use this "
            f"version; restore it from a backup or register the artifact again."
        )
    return manifest_from_json(json.loads(data), store.uri(store.files_dir(name, number)))


def _span(numbers: list[int]) -> str:
    numbers = sorted(numbers)
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
    return ", ".join(map(str, numbers))
