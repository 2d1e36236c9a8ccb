"""Import a file-based registry (each model's index.json) into the metadata store, once.

Before the metadata store, each model's versions, aliases and alias history lived in
`<root>/<name>/index.json`. Migrating copies every entry, history included, in one transaction
per model, then renames the file to index.json.migrated: kept, but no longer read. Versions'
files and manifests stay where they are. Running it again imports nothing twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mlplatform.errors import RegistryError

from mlplatform.registry._index import FILE_INDEX, _MOVE_FIELDS, _VERSION_FIELDS, Index, file_indexed, update_index
from mlplatform.registry._records import INDEX_FORMAT
from mlplatform.registry._store import Store

MIGRATED_SUFFIX = ".migrated"
_OLD_LOCK = ".lock"


@dataclass(frozen=True)
class Migrated:
    """One model's outcome: how many versions and alias moves were imported."""

    name: str
    versions: int
    alias_moves: int
    already: bool  # the store held it already (an earlier run stopped before renaming the file)


def migrate(root: str | os.PathLike[str] | None = None) -> list[Migrated]:
    """Import every model under `root` that still has an index.json; returns what was imported."""
    store = Store(root)
    done = []
    for name in file_indexed(store):
        path = store.path(name, FILE_INDEX)
        old = _read(store, path)

        def change(index: Index, old: Index = old) -> bool:
            if index["versions"]:
                return True
            index["versions"].extend(old["versions"])
            index["aliases"].update(old["aliases"])
            index["alias_history"].extend(old["alias_history"])
            return False

        already = update_index(store, name, change, create=True)
        store.move(path, path + MIGRATED_SUFFIX)
        if store.exists(store.path(name, _OLD_LOCK)):
            store.fs.delete_file(store.path(name, _OLD_LOCK))  # the file index's flock target, now unused
        done.append(Migrated(name, len(old["versions"]), len(old["alias_history"]), already))
    return done


def _read(store: Store, path: str) -> Index:
    """The old index, checked field by field: a damaged file imports nothing."""
    where = store.uri(path)
    try:
        index = json.loads(store.read_bytes(path) or b"")
    except ValueError as e:
        raise RegistryError(f"{where} is not valid JSON ({e}); restore it from a backup, then migrate again.") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise RegistryError(f"{where} is not a format-{INDEX_FORMAT} registry index; nothing was imported from it.")
    try:
        versions = [{f: v[f] for f in _VERSION_FIELDS} for v in index["versions"]]
        aliases = {str(a): int(n) for a, n in index["aliases"].items()}
        moves = [{f: m.get(f) for f in _MOVE_FIELDS} for m in index["alias_history"]]
        _check(versions, aliases, moves)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RegistryError(
            f"{where} is damaged ({type(e).__name__}: {e}); nothing was imported from it. Restore it from a backup."
        ) from None
    return {"versions": versions, "aliases": aliases, "alias_history": moves}


def _check(versions: list[dict[str, Any]], aliases: dict[str, int], moves: list[dict[str, Any]]) -> None:
    numbers = [v["version"] for v in versions]
    if not all(isinstance(n, int) for n in numbers) or len(set(numbers)) != len(numbers):
        raise ValueError(f"version numbers {numbers} are not distinct integers")
    dangling = {a: n for a, n in aliases.items() if n not in numbers}
    if dangling:
        raise ValueError(f"aliases {dangling} name versions that are not listed")
    if any(m["alias"] is None or m["to_version"] is None for m in moves):
        raise ValueError("an alias move has no alias or target")
