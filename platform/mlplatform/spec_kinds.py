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
    # A hyperparameter search; its `train:` names a TrainSpec YAML relative to the tune spec.
    "tune": "mlplatform.tune.spec:TuneSpec",
    # A Serve config file; each application's `args:` is a ServeSpec (what build_app validates).
    "serve": "mlplatform.serve._spec:ServeConfigFile",
}

# Glob (relative to the repository root) → kind of the YAML files it matches; the first
# matching glob decides, so specific globs come before general ones.
SHIPPED: dict[str, str] = {
    "cluster_configs/local/*.yaml": "cluster",
    "cluster_configs/residency/*.yaml": "residency",
    "cluster_configs/prices/*.yaml": "prices",
    "jobs/configs/export-*.yaml": "export",
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
