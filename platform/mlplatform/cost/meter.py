"""Metering: what each actor and task of a job held, where, for how long, priced by the catalog.

The evidence is Ray's: the GCS actor table (each actor's node, start and end time), the state
API's actor records (the resources each reserved) and its task records (who created each actor;
each normal task's node, resources and run time). Ray Train's,
Ray Tune's, Ray Data's and Serve's own actors are in them like the user's. A holder pays
`catalog.share(held, node total) × node price per hour × seconds` (see catalog.py); an actor
still alive is metered up to now, and metering again replaces its row, so a ledger filled
in several passes (a driver restarted, a trial preempted) counts every second once.

Attribution: a tuning trial registers its actor id under its trial id in the cluster's GCS
(`claim`); every actor and task whose chain of creators leads to that actor (the trial's
Train controller, its workers, their Data tasks) is the trial's. Serve replicas carry their
application and deployment in their actor names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Iterable, Mapping
from typing import Any

from mlplatform.cost import catalog as _catalog
from mlplatform.cost.ledger import Usage

_KV_NAMESPACE = "mlplatform"
_OWNER_PREFIX = "cost/trial/"
# Task ids embed the id of the actor that ran them (the last 16 bytes); a driver's or a
# normal task's carry the job's nil actor id, all 0xff but the job id.
_NIL_ACTOR_HEX = "ff" * 12
_SERVE_REPLICA = "SERVE_REPLICA::"
_STATE_LIMIT = 10_000
# The longest spot notice clouds give (Azure 30 s, GCP 30 s, AWS 2 min) with room to spare: an
# actor that ended this long before its node was preempted ended because of the notice.
_NOTICE_MAX_S = 300.0


def ledger_job_id(job_id: str) -> str:
    """The ledger's key for a job of the connected cluster: Ray's job id and the cluster's session.

    Ray numbers jobs afresh each time a cluster starts, so "05000000" alone would merge the
    jobs of different cluster runs; `cost report --job 05000000` finds the newest one.
    """
    import ray

    session = ray._private.worker.global_worker.node.session_name.removeprefix("session_")
    return f"{job_id}@{session}"


def ray_job_id(ledger_job: str) -> str:
    """Ray's job id back from a ledger key."""
    return ledger_job.split("@", 1)[0]


def claim(trial_id: str) -> None:
    """Record that the calling actor (a tuning trial's driver) works for `trial_id`."""
    import ray
    from ray.experimental import internal_kv

    actor_id = ray.get_runtime_context().get_actor_id()
    if actor_id:
        internal_kv._internal_kv_put(_OWNER_PREFIX + actor_id, trial_id, overwrite=True, namespace=_KV_NAMESPACE)


def meter_job(job_id: str, cluster: str, catalog: _catalog.PriceCatalog, *, now: float | None = None) -> list[Usage]:
    """Every actor and task of Ray's job `job_id`, priced: one Usage per holder of resources.

    The usages are keyed by `ledger_job_id(job_id)`.
    """
    from ray._private import state
    from ray.util.state import list_actors, list_tasks

    now = time.time() if now is None else now
    nodes = _nodes()
    actors = [a for a in state.actors().values() if a.get("JobID") == job_id]
    # What each actor reserved (the state API's actor records; Serve's replicas have no task events).
    reserved = {a.actor_id: a.required_resources or {} for a in list_actors(
        filters=[("job_id", "=", job_id)], detail=True, limit=_STATE_LIMIT, raise_on_missing_output=False)}
    tasks = list_tasks(
        filters=[("job_id", "=", job_id)], detail=True, limit=_STATE_LIMIT, raise_on_missing_output=False
    )
    creator = {t.actor_id: _actor_of(t.parent_task_id) for t in tasks if t.type == "ACTOR_CREATION_TASK"}
    owners = _trial_owners([a["ActorID"] for a in actors])
    job_id = ledger_job_id(job_id)  # the rows' key from here on

    usages = []
    for a in actors:
        if not a.get("StartTime") or a["ActorID"] not in reserved:
            continue  # never started, or Ray no longer shows what it held
        ended = a["EndTime"] / 1000 if a.get("EndTime") else None
        name = a.get("Name") or a.get("ActorClassName") or "actor"
        usages.append(_usage(
            cluster, catalog, nodes, now, job_id=job_id, item_id=a["ActorID"], kind="actor", name=name,
            node_id=(a.get("Address") or {}).get("NodeID"), held=reserved[a["ActorID"]],
            started=a["StartTime"] / 1000, ended=ended, preempted=ended is not None and _on_preempted_node(a, nodes),
            trial=_trial_of(a["ActorID"], creator, owners), deployment=_deployment(name),
        ))
    for t in tasks:
        if t.type != "NORMAL_TASK" or not t.start_time_ms:
            continue
        usages.append(_usage(
            cluster, catalog, nodes, now, job_id=job_id, item_id=f"{t.task_id}:{t.attempt_number}", kind="task",
            name=t.func_or_class_name or t.name, node_id=t.node_id, held=t.required_resources or {},
            started=t.start_time_ms / 1000, ended=t.end_time_ms / 1000 if t.end_time_ms else None,
            preempted=False, trial=_trial_of(_actor_of(t.parent_task_id), creator, owners), deployment=None,
        ))
    return [u for u in usages if u is not None]


def serve_jobs() -> list[str]:
    """Jobs that own Serve replicas (Serve's controller job), for metering deployments."""
    from ray._private import state

    return sorted({a["JobID"] for a in state.actors().values() if (a.get("Name") or "").startswith(_SERVE_REPLICA)})


def _usage(cluster, catalog, nodes, now, *, job_id, item_id, kind, name, node_id, held, started, ended, preempted,
           trial, deployment) -> Usage | None:
    node = nodes.get(node_id or "")
    if node is None:
        return None
    held = _plain(held)
    if not any(held.get(r) for r in ("CPU", "GPU")):
        return None  # holds nothing priced (Ray Train's 0-CPU controller, Serve's proxies)
    share = _catalog.share(held, node.resources)
    per_hour = catalog.price(node.region, node.group, node.market)
    seconds = max(0.0, (ended if ended is not None else now) - started)
    return Usage(
        cluster=cluster, item_id=item_id, job_id=job_id, kind=kind, name=name, trial=trial, deployment=deployment,
        node_id=node_id, region=node.region, node_group=node.group, market=node.market,
        cpus=float(held.get("CPU", 0.0)), gpus=float(held.get("GPU", 0.0)), share=share,
        started_at=started, ended_at=ended, seconds=seconds, price_per_hour=per_hour,
        cost=_catalog.cost_of(share, per_hour, seconds), currency=catalog.currency, preempted=preempted,
    )


@dataclass(frozen=True)
class _Node:
    region: str
    group: str
    market: str
    resources: Mapping[str, float]
    preempted_at: float | None  # when it went after a preemption notice (a drain with reason PREEMPTION)


def _nodes() -> dict[str, _Node]:
    """Every node the cluster has had, dead ones included, with the totals it was started with.

    The state API keeps a dead node's labels and total resources (ray.nodes() empties them),
    and says why it died: "Terminated due to preemption" after a PREEMPTION drain.
    """
    from ray.util.state import list_nodes

    from mlplatform.cluster.spec import GROUP_LABEL, MARKET_LABEL, REGION_LABEL

    out = {}
    for n in list_nodes(detail=True, limit=_STATE_LIMIT, raise_on_missing_output=False):
        labels = n.labels or {}
        out[n.node_id] = _Node(
            region=labels.get(REGION_LABEL, "unknown"), group=labels.get(GROUP_LABEL, "unknown"),
            market=labels.get(MARKET_LABEL, "on-demand"), resources=dict(n.resources_total or {}),
            preempted_at=(n.end_time_ms or 0) / 1000 or None
            if n.state == "DEAD" and "preemption" in (n.state_message or "").lower() else None,
        )
    return out


def _on_preempted_node(actor: Mapping[str, Any], nodes: Mapping[str, _Node]) -> bool:
    """The actor ended within a notice period before its node was taken by a preemption."""
    node = nodes.get((actor.get("Address") or {}).get("NodeID") or "")
    if node is None or node.preempted_at is None:
        return False
    return node.preempted_at - _NOTICE_MAX_S <= actor["EndTime"] / 1000 <= node.preempted_at + 5


def _plain(resources: Mapping[str, Any]) -> dict[str, float]:
    """Resources by base name: a placement-group bundle's `CPU_group_0_<pg>` counts as CPU.

    A bundle's resources appear both as `CPU_group_<pg>` and `CPU_group_<i>_<pg>`; the
    largest figure per base name is what the holder reserved.
    """
    out: dict[str, float] = {}
    for key, amount in resources.items():
        base = key.split("_group_", 1)[0]
        out[base] = max(out.get(base, 0.0), float(amount))
    return out


def _actor_of(task_id: str | None) -> str | None:
    if not task_id or len(task_id) < 32:
        return None
    actor = task_id[-32:]
    return None if actor.startswith(_NIL_ACTOR_HEX) else actor


def _trial_of(actor_id: str | None, creator: Mapping[str, str | None], owners: Mapping[str, str]) -> str | None:
    seen: set[str] = set()
    while actor_id and actor_id not in seen:
        if actor_id in owners:
            return owners[actor_id]
        seen.add(actor_id)
        actor_id = creator.get(actor_id)
    return None


def _trial_owners(actor_ids: Iterable[str]) -> dict[str, str]:
    from ray.experimental import internal_kv

    out = {}
    for aid in actor_ids:
        trial = internal_kv._internal_kv_get(_OWNER_PREFIX + aid, namespace=_KV_NAMESPACE)
        if trial:
            out[aid] = trial.decode()
    return out


def _deployment(name: str) -> str | None:
    """`SERVE_REPLICA::app#deployment#suffix` → `app/deployment`."""
    if not name.startswith(_SERVE_REPLICA):
        return None
    parts = name[len(_SERVE_REPLICA):].split("#")
    return "/".join(parts[:2]) if len(parts) >= 2 else None


def describe(usages: Iterable[Usage]) -> dict[str, Any]:
    """Totals of a set of usages: cost, CPU-seconds, markets and regions (for job logs and lineage)."""
    rows = list(usages)
    return {
        "cost": round(sum(u.cost for u in rows), 6),
        "currency": rows[0].currency if rows else None,
        "cpu_seconds": round(sum(u.cpus * u.seconds for u in rows), 3),
        "gpu_seconds": round(sum(u.gpus * u.seconds for u in rows), 3),
        "markets": sorted({u.market for u in rows}),
        "regions": sorted({u.region for u in rows}),
    }


def refresh(ledger) -> int:
    """Meter again every job of the connected cluster that the ledger knows, and Serve's jobs.

    What a driver stopped before its last pass left open is closed from Ray's records (the
    GCS keeps dead actors' end times while the cluster runs). Returns the rows written.
    """
    import os

    from mlplatform.cost import catalog as cat
    from mlplatform.residency import CLUSTER_ENV

    catalog = cat.current()
    if catalog is None:
        return 0
    cluster = os.environ.get(CLUSTER_ENV) or "local"
    # Jobs of this cluster run only: earlier runs' jobs are gone from the GCS (their rows stay).
    this_run = ledger_job_id("")
    jobs = {ray_job_id(j.job_id) for j in ledger.jobs(cluster=cluster) if j.job_id.endswith(this_run)}
    written = 0
    for job_id in sorted(jobs | set(serve_jobs())):
        usages = meter_job(job_id, cluster, catalog)
        written += ledger.record(usages)
    return written
