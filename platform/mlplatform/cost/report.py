"""Cost reports from the ledger: per job, trial, deployment, region or market, as JSON-able dicts.

Each row sums the usage rows of one group: `cost` (what work held, priced when metered),
`cpu_seconds` = Σ cpus × seconds, `gpu_seconds` = Σ gpus × seconds, `seconds` = Σ seconds, the
markets and regions it ran in, and `items` (actors and tasks). `lost_cost` is the cost of work lost
to preemption (the ledger's cost_lost), already inside `cost`: it says how much of it bought
nothing. Lost work carries a job and trial but no region, market or deployment, so grouped by
region or market (or by deployment) the rows hold none of it and only the total does.
Usage with no trial (or deployment) groups under "(job)".
"""

from __future__ import annotations

from typing import Any

from mlplatform.errors import CostError

BY = ("job", "trial", "deployment", "region", "market")
NONE_KEY = "(job)"


def report(ledger: Any, *, cluster: str | None = None, job: str | None = None, by: str = "job") -> dict[str, Any]:
    """The ledger's costs grouped `by` job, trial, deployment, region or market (see the module doc)."""
    if by not in BY:
        raise CostError(f"Got {by!r} for `by`; must be one of {', '.join(BY)}.")
    if job and "@" not in job:
        job = _newest_run_of(ledger, cluster, job)
    usages = ledger.usages(cluster=cluster, job_id=job)
    lost = ledger.lost(cluster=cluster, job_id=job)
    currencies = sorted({u.currency for u in usages} | {x.currency for x in lost})
    if len(currencies) > 1:
        raise CostError(
            f"The ledger holds costs in {', '.join(currencies)}; a report adds up one currency. Report one "
            "cluster at a time (`--cluster NAME`), or one job (`--job ID`)."
        )
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}

    def group(key: tuple[Any, ...]) -> dict[str, Any]:
        if key not in groups:
            groups[key] = {"key": key[-1], "clusters": set(), "jobs": set(), "cost": 0.0, "lost_cost": 0.0,
                           "cpu_seconds": 0.0, "gpu_seconds": 0.0, "seconds": 0.0, "markets": set(),
                           "regions": set(), "items": 0}
        return groups[key]

    for u in usages:
        g = group(_key(by, u.cluster, u.job_id, u.trial, u.deployment, u.region, u.market))
        g["clusters"].add(u.cluster)
        g["jobs"].add(u.job_id)
        g["cost"] += u.cost
        g["cpu_seconds"] += u.cpus * u.seconds
        g["gpu_seconds"] += u.gpus * u.seconds
        g["seconds"] += u.seconds
        g["markets"].add(u.market)
        g["regions"].add(u.region)
        g["items"] += 1
    for x in lost:
        if by in ("job", "trial"):
            g = group(_key(by, x.cluster, x.job_id, x.trial, None, None, None))
            g["clusters"].add(x.cluster)
            g["jobs"].add(x.job_id)
            g["lost_cost"] += x.cost

    rows = [_row(g) for g in groups.values()]
    rows.sort(key=lambda r: (-r["cost"], str(r["job_id"]), str(r["key"])))
    total = {
        "cost": sum(u.cost for u in usages),
        "lost_cost": sum(x.cost for x in lost),
        "cpu_seconds": sum(u.cpus * u.seconds for u in usages),
        "gpu_seconds": sum(u.gpus * u.seconds for u in usages),
        "seconds": sum(u.seconds for u in usages),
        "markets": sorted({u.market for u in usages}),
        "regions": sorted({u.region for u in usages}),
        "items": len(usages),
        "jobs": len({(u.cluster, u.job_id) for u in usages} | {(x.cluster, x.job_id) for x in lost}),
    }
    return {"currency": currencies[0] if currencies else None, "by": by, "cluster": cluster, "job": job,
            "rows": rows, "total": total}


def format_table(report: dict[str, Any]) -> str:
    """The report as a text table with a TOTAL line (what `mlplatform cost report` prints)."""
    from mlplatform.cli import table

    currency = report["currency"] or ""
    by = report["by"]
    if not report["rows"]:
        scope = " ".join(f"{k} {report[k]}" for k in ("cluster", "job") if report.get(k))
        return f"No costs recorded{' for ' + scope if scope else ''}."
    with_job = by in ("trial", "deployment")
    headers = [by.upper(), *(["JOB"] if with_job else []), f"COST {currency}".strip(), "LOST", "CPU-H", "GPU-H",
               "MARKETS", "REGIONS", "ITEMS"]

    def line(key: str, job: Any, r: dict[str, Any]) -> list[Any]:
        return [key, *([job or "-"] if with_job else []), f"{r['cost']:.4f}",
                f"{r['lost_cost']:.4f}" if r["lost_cost"] else "-", f"{r['cpu_seconds'] / 3600:.2f}",
                f"{r['gpu_seconds'] / 3600:.2f}", ",".join(r["markets"]) or "-", ",".join(r["regions"]) or "-",
                r["items"]]

    rows = [line(str(r["key"]), r["job_id"], r) for r in report["rows"]]
    rows.append(line("TOTAL", "", report["total"]))
    return table(headers, rows)


def _newest_run_of(ledger: Any, cluster: str | None, job: str) -> str:
    """A Ray job id (e.g. 05000000) as the ledger keys it: `<id>@<cluster session>`, the newest
    session's when the cluster has been started several times (Ray numbers jobs afresh each time)."""
    runs: dict[str, float] = {}
    for u in ledger.usages(cluster=cluster):
        if u.job_id.split("@", 1)[0] == job:
            runs[u.job_id] = max(runs.get(u.job_id, 0.0), u.started_at)
    return max(runs, key=runs.get) if runs else job


def _key(by: str, cluster: str, job_id: str, trial: str | None, deployment: str | None, region: str | None,
         market: str | None) -> tuple[Any, ...]:
    if by == "job":
        return (cluster, job_id)
    if by == "trial":
        return (cluster, job_id, trial or NONE_KEY)
    if by == "deployment":
        return (cluster, job_id, deployment or NONE_KEY)
    return (region,) if by == "region" else (market,)


def _only(values: set[Any]) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def _row(g: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": g["key"], "job_id": _only(g["jobs"]), "cluster": _only(g["clusters"]),
        "cost": g["cost"], "lost_cost": g["lost_cost"], "cpu_seconds": g["cpu_seconds"],
        "gpu_seconds": g["gpu_seconds"], "seconds": g["seconds"], "markets": sorted(g["markets"]),
        "regions": sorted(g["regions"]), "items": g["items"],
    }


__all__ = ["BY", "format_table", "report"]
