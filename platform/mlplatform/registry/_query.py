"""Read-only views: list models and versions, show one version, diff two."""

from __future__ import annotations

import os
from typing import Any

from mlplatform.errors import RegistryError

from mlplatform.registry._index import load_version, model_names, read_index, select
from mlplatform.registry._names import check_name, parse_ref, parse_selector
from mlplatform.registry._records import Version, VersionDiff
from mlplatform.registry._store import Store

Root = str | os.PathLike[str] | None
_MISSING = None  # a key present in only one version diffs against None
_LINEAGE_COMPARED = (
    "dataset_fingerprint", "model_ref", "input_signature", "job_id", "storage_region", "classification",
    "training_regions",
)


def list_models(*, root: Root = None) -> list[str]:
    """Names of all registered models, sorted."""
    store = Store(root)
    if not store.exists(store.root):
        raise RegistryError(
            f"Registry root {store.display} (`root`) does not exist. Check the path, or "
            f"register a model there first."
        )
    return model_names(store)


def list_versions(name: str, *, root: Root = None) -> list[Version]:
    """Every version of model `name`, oldest first."""
    check_name(name)
    store = Store(root)
    index = read_index(store, name)
    return [load_version(store, index, v["version"]) for v in index["versions"]]


def resolve(ref: str, *, root: Root = None) -> Version:
    """The version `ref` names: 'name' (latest), 'name@3', 'name@latest' or 'name@alias'."""
    name, selector = parse_ref(ref)
    store = Store(root)
    index = read_index(store, name)
    return load_version(store, index, select(index, selector, "ref"))


def show(ref: str, *, root: Root = None) -> Version:
    """One version with its lineage and file hashes (the same lookup as resolve)."""
    return resolve(ref, root=root)


def diff(name: str, a: int | str, b: int | str, *, root: Root = None) -> VersionDiff:
    """What changed from version `a` to `b` (numbers or aliases): metrics, spec, lineage, files."""
    check_name(name)
    sel_a, sel_b = parse_selector(a, "a"), parse_selector(b, "b")
    store = Store(root)
    index = read_index(store, name)
    va = load_version(store, index, select(index, sel_a, "a"))
    vb = load_version(store, index, select(index, sel_b, "b"))
    files_a = {f.path: f.sha256 for f in va.files}
    files_b = {f.path: f.sha256 for f in vb.files}
    return VersionDiff(
        name=name,
        a=va.version,
        b=vb.version,
        metrics=_changed(va.lineage.metrics, vb.lineage.metrics),
        spec=_changed(_flatten(va.lineage.spec), _flatten(vb.lineage.spec)),
        lineage=_changed(
            {k: getattr(va.lineage, k) for k in _LINEAGE_COMPARED},
            {k: getattr(vb.lineage, k) for k in _LINEAGE_COMPARED},
        ),
        files_added=tuple(sorted(set(files_b) - set(files_a))),
        files_removed=tuple(sorted(set(files_a) - set(files_b))),
        files_changed=tuple(
            sorted(p for p in files_a.keys() & files_b.keys() if files_a[p] != files_b[p])
        ),
    )


def _changed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {
        k: (a.get(k, _MISSING), b.get(k, _MISSING))
        for k in sorted(set(a) | set(b))
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as {'train.lr': 0.1, ...}, so a diff names the exact field."""
    if not isinstance(value, dict):
        return {prefix or "spec": value} if value is not None else {}
    out: dict[str, Any] = {}
    for k, v in value.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out
