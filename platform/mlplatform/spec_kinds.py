"""Which model validates which kind of spec file, and where each kind is shipped.

One table serves `mlplatform validate` and the test that loads every shipped YAML.
Models are named as "module:Class" so that reading this table imports nothing heavy.
"""

from __future__ import annotations

import importlib
from pathlib import PurePosixPath

from pydantic import BaseModel

KINDS: dict[str, str] = {
    "cluster": "mlplatform.cluster.spec:ClusterSpec",
    "residency": "mlplatform.residency.policy:ResidencyPolicy",
    "prices": "mlplatform.cost.catalog:PriceCatalog",
    "train": "mlplatform.train.spec:TrainSpec",
    "export": "mlplatform.export._spec:ExportSpec",
    "compress": "mlplatform.compress._spec:CompressSpec",
    # A hyperparameter search; its `train:` names a TrainSpec YAML relative to the tune spec.
    "tune": "mlplatform.tune.spec:TuneSpec",
    # A Serve config file; each application's `args:` is a ServeSpec (what build_app validates).
    "serve": "mlplatform.serve._spec:ServeConfigFile",
}

# Glob (relative to the repository root) → kind of the YAML files it matches; the first
# matching glob decides, so specific globs come before general ones.
SHIPPED: dict[str, str] = {
    "cluster_configs/local/*.yaml": "cluster",
    "cluster_configs/cloud/*.yaml": "cluster",
    "cluster_configs/residency/*.yaml": "residency",
    "cluster_configs/prices/*.yaml": "prices",
    "jobs/configs/export-*.yaml": "export",
    "jobs/configs/compress-*.yaml": "compress",
    "jobs/configs/tune-*.yaml": "tune",
    "jobs/configs/*.yaml": "train",
    "serve_apps/*.yaml": "serve",
}


def model_for(kind: str) -> type[BaseModel]:
    """The spec model of `kind` (see KINDS)."""
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def kind_of(path: str) -> str | None:
    """The kind of a spec file, judged by where it sits (None when unknown)."""
    posix = PurePosixPath(path)
    for pattern, kind in SHIPPED.items():
        parts = len(PurePosixPath(pattern).parts)
        tail = PurePosixPath(*posix.parts[-parts:]) if len(posix.parts) >= parts else posix
        if tail.match(pattern):
            return kind
    return None


def _keys_of(kind: str) -> frozenset[str]:
    """The top-level keys a file of `kind` may hold (field names and their aliases)."""
    fields = model_for(kind).model_fields
    return frozenset(name for name in fields) | frozenset(f.alias for f in fields.values() if f.alias)


def distinctive_keys() -> dict[str, frozenset[str]]:
    """Per kind, the top-level keys no other kind has: what `kind_from_content` judges by.

    Read from the models themselves, so a field added to a spec changes the inference with it.
    """
    keys = {kind: _keys_of(kind) for kind in KINDS}
    return {kind: own - frozenset().union(*(k for other, k in keys.items() if other != kind)) for kind, own in keys.items()}


def kind_from_content(path: str) -> str:
    """The kind of a spec file, judged by its top-level keys: the one kind whose distinctive keys it uses.

    Raises:
        SpecError: the file cannot be read as a YAML mapping, or its keys point to no kind or to
            several (the message lists the kinds and the `--kind` flag).
    """
    from mlplatform.errors import SpecError

    choose = f"pass --kind ({', '.join(KINDS)})"
    from mlplatform.config import read_yaml

    try:
        with open(path, encoding="utf-8") as f:
            data, _ = read_yaml(f.read(), str(path))
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror}); check the path.") from None
    except SpecError as e:
        raise SpecError(f"{e} Fix it, or {choose}.") from None
    if not isinstance(data, dict) or not data:
        got = "an empty file" if data is None or data == {} else f"a YAML {type(data).__name__}"
        raise SpecError(f"{path}: holds {got}, not a mapping of spec fields, so its kind cannot be told; "
                        f"every spec is a mapping; {choose}.")
    present = {str(k) for k in data}
    hits = {kind: sorted(present & keys) for kind, keys in distinctive_keys().items() if present & keys}
    if len(hits) == 1:
        return next(iter(hits))
    if not hits:
        raise SpecError(f"{path}: cannot tell what kind of spec this is from where it sits or from its keys "
                        f"({', '.join(sorted(present))}: none belongs to one kind only); {choose}.")
    which = "; ".join(f"{kind} ({', '.join(keys)})" for kind, keys in hits.items())
    raise SpecError(f"{path}: its keys fit more than one kind of spec: {which}; {choose}.")
