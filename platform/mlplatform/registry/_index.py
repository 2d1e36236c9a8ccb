"""Reading and updating a model's index.json, and turning selectors into version numbers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from mlplatform.errors import (
    AliasNotFound,
    IntegrityError,
    ModelNotFound,
    RegistryError,
    VersionNotFound,
)

from mlplatform.registry._names import NAME_PATTERN, Selector
from mlplatform.registry._records import INDEX_FORMAT, Version, manifest_from_json
from mlplatform.registry._store import Store

T = TypeVar("T")
Index = dict[str, Any]


def new_index(name: str) -> Index:
    return {
        "format": INDEX_FORMAT, "name": name, "versions": [], "aliases": {}, "alias_history": [],
    }


def model_names(store: Store) -> list[str]:
    """Names of the models under the root that have an index (registered at least once)."""
    return sorted(
        d for d in store.list_dirs(store.root)
        if NAME_PATTERN.match(d) and store.exists(store.index_path(d))
    )


def read_index(store: Store, name: str) -> Index:
    """The model's index; raises ModelNotFound if it was never registered."""
    data = store.read_bytes(store.index_path(name))
    if data is None:
        known = model_names(store) if store.exists(store.root) else []
        listing = ", ".join(known) if known else "none"
        raise ModelNotFound(
            f"No model {name!r} in registry {store.display}; registered models: {listing}. "
            f"Check `name` and `root`, or register it first with register(artifact_dir, {name!r})."
        )
    try:
        index = json.loads(data)
    except ValueError as e:
        raise RegistryError(
            f"{store.uri(store.index_path(name))} is not valid JSON ({e}); it was changed "
            f"outside the registry. Restore it from a backup."
        ) from None
    if index.get("format") != INDEX_FORMAT:
        raise RegistryError(
            f"{store.uri(store.index_path(name))} has format {index.get('format')!r}; this "
            f"version of mlplatform reads format {INDEX_FORMAT}. Upgrade mlplatform."
        )
    return index


def update_index(
    store: Store, name: str, change: Callable[[Index], T], *, create: bool = False
) -> T:
    """Apply `change` to the index under the model's lock and write it back atomically."""
    if not create:
        read_index(store, name)  # fail before the lock creates anything for an unknown model
    with store.lock(name):
        try:
            index = read_index(store, name)
        except ModelNotFound:
            if not create:
                raise
            index = new_index(name)
        result = change(index)
        store.write_atomic(store.index_path(name), json.dumps(index, indent=1).encode())
    return result


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
        raise IntegrityError(
            f"Model {name!r} version {number}: {store.uri(path)} was modified after "
            f"registration (its sha256 no longer matches index.json). Do not use this "
            f"version; restore it from a backup or register the artifact again."
        )
    return manifest_from_json(json.loads(data), store.uri(store.files_dir(name, number)))


def _span(numbers: list[int]) -> str:
    numbers = sorted(numbers)
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
    return ", ".join(map(str, numbers))
