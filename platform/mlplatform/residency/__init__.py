"""Data residency: policy, classification, placement, runtime guard, audit.

The operator declares a policy per cluster (cluster_configs/residency/*.yaml, named by the
cluster spec); each spec names its data's classification; the platform compiles the two into
every placement it makes and checks it before submission (`mlplatform residency check`).

Names load on first use: every Ray worker process imports `mlplatform.residency.guard`, and
importing this package must not pull the policy model (pydantic) into each of them.
"""

from __future__ import annotations

import importlib
from typing import Any

from mlplatform.residency.names import CLUSTER_ENV, KV_KEY, POLICY_ENV, REGION_LABEL

_LAZY = {
    "apply": "active", "current": "active", "encode": "active", "for_cluster_spec": "active", "load": "active",
    "publish": "active", "record": "active",
    "ANY_REGION": "policy", "ClassificationRule": "policy", "ResidencyPolicy": "policy",
    "confined": "lineage", "inherit": "lineage",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = ["CLUSTER_ENV", "KV_KEY", "POLICY_ENV", "REGION_LABEL", *_LAZY]
