"""Cost metrics through ray.util.metrics, for Prometheus and the Grafana dashboard.

Ray exports them with a `ray_` prefix: `ray_mlplatform_cost_total`, `ray_mlplatform_cost_lost_total`.
Created lazily (ray.util.metrics needs a connected worker); call `publish` from a process
connected to the cluster, e.g. the metering loop, with the rows of report(..., by="trial").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from mlplatform.observability import metrics as catalogue

TAG_KEYS = catalogue.COST_TAGS


@lru_cache(maxsize=1)
def metrics() -> dict[str, Any]:
    """Every cost metric by short name."""
    # Defined in the platform's one catalogue (mlplatform.observability.metrics).
    return {"total": catalogue.instrument("mlplatform_cost_total"),
            "lost": catalogue.instrument("mlplatform_cost_lost_total")}


def tags(row: Mapping[str, Any], currency: str | None, by: str = "trial") -> dict[str, str]:
    """The metric tags of one report row (lists joined with commas; missing values empty)."""
    return {
        "job": str(row.get("job_id") or ""),
        "trial": str(row.get("key") or "") if by == "trial" else "",
        "market": ",".join(row.get("markets") or ()),
        "region": ",".join(row.get("regions") or ()),
        "currency": currency or "",
    }


def publish(report_rows: Iterable[Mapping[str, Any]], currency: str | None = None, by: str = "trial") -> None:
    """Set both gauges for each row of a cost report (report(...)["rows"])."""
    gauges = metrics()
    for row in report_rows:
        t = tags(row, currency, by)
        gauges["total"].set(float(row["cost"]), tags=t)
        gauges["lost"].set(float(row.get("lost_cost") or 0.0), tags=t)
