"""Cost: price catalog, ledger of every metered resource-second, reports.

The operator names a price catalog in the cluster spec (cluster_configs/prices/*.yaml);
`cluster up` publishes it, every job's usage is priced from it into the ledger (metadata
store), and `mlplatform cost report` adds it up per job, trial, deployment, region or market.

Names load on first use, so importing this package pulls in neither pydantic models nor SQLAlchemy.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PriceCatalog": "catalog", "current": "catalog", "load": "catalog", "share": "catalog",
    "Ledger": "ledger", "Lost": "ledger", "Usage": "ledger", "open_ledger": "ledger",
    "format_table": "report",
}
# Modules: `cost.report.report(ledger, by="trial")` (a function of that name here would be
# replaced by the module the moment anything imports mlplatform.cost.report).
_MODULES = ("catalog", "ledger", "metrics", "report")


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


__all__ = [*_LAZY, *_MODULES]
