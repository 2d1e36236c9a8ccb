"""Where work actually ran, from Ray's state API, checked against each job's classification.

Placement and the runtime guard prevent; the sweep detects. It reads every actor and task of
every job (Ray Train's, Ray Data's and Serve's internal ones included, and work submitted
without the platform) with the node Ray ran it on, and reports each one outside the regions the
job's classification allows. A job's classification is the one its driver declared (guard.declare),
else the policy's default. Needs a connected Ray (`mlplatform.cluster.connect`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlplatform.residency import guard
from mlplatform.residency.names import REGION_LABEL
from mlplatform.residency.policy import ResidencyPolicy

# Workers report task events to the state API about once a second (task_events_report_interval_ms).
TASK_EVENTS_DELAY_S = 2.0
_LIMIT = 10_000  # the state API refuses more per call (RAY_MAX_LIMIT_FROM_API_SERVER)


@dataclass(frozen=True)
class Placement:
    """One actor or task of a job and the node it ran on."""

    job_id: str
    kind: str  # "actor" or "task"
    name: str
    id: str
    state: str
    node_id: str
    region: str | None


@dataclass(frozen=True)
class Finding:
    """A placement outside its job's allowed regions."""

    placement: Placement
    classification: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.placement), "classification": self.classification, "reason": self.reason}


def placements(job_id: str | None = None, labels: dict[str, dict[str, str]] | None = None) -> list[Placement]:
    """Every actor and task (of one job, or of all) that Ray placed on a node, with that node's region.

    `labels`: node id → labels, if the caller has them already.
    """
    from ray.util.state import list_actors, list_tasks

    labels = _node_labels() if labels is None else labels
    filters = [("job_id", "=", job_id)] if job_id else None
    found = []
    for a in list_actors(filters=filters, detail=True, limit=_LIMIT, raise_on_missing_output=False):
        if a.node_id:
            found.append(Placement(a.job_id, "actor", a.class_name, a.actor_id, a.state, a.node_id,
                                   labels.get(a.node_id, {}).get(REGION_LABEL)))
    for t in list_tasks(filters=filters, detail=True, limit=_LIMIT, raise_on_missing_output=False):
        # Actor tasks run in their actor's process, already listed; a task not yet scheduled has no node.
        if t.node_id and t.type != "ACTOR_TASK":
            found.append(Placement(t.job_id, "task", t.name, t.task_id, t.state, t.node_id,
                                   labels.get(t.node_id, {}).get(REGION_LABEL)))
    return found


def sweep(policy: ResidencyPolicy, job_id: str | None = None) -> tuple[list[Placement], list[Finding]]:
    """(everything checked, what is outside its regions) for one job or every job."""
    labels = _node_labels()
    checked = placements(job_id, labels)
    classification: dict[str, str] = {}
    findings = []
    rules = policy.to_json()
    for p in checked:
        if p.job_id not in classification:
            classification[p.job_id] = guard.declared(p.job_id) or policy.default_classification
        why = guard.violation(rules, classification[p.job_id], labels.get(p.node_id, {}))
        if why:
            findings.append(Finding(p, classification[p.job_id], why))
    return checked, findings


def where(checked: list[Placement]) -> dict[str, list[str]]:
    """The regions and node ids a set of placements used: what the audit's `ran` record keeps."""
    return {"regions": sorted({p.region or "(none)" for p in checked}), "node_ids": sorted({p.node_id for p in checked})}


def _node_labels() -> dict[str, dict[str, str]]:
    """Node id → labels, dead nodes included (work that ran on a node since removed still counts)."""
    import ray

    from mlplatform.cluster.inventory import from_ray_nodes

    return {n.node_id: dict(n.labels) for n in from_ray_nodes(ray.nodes())}


__all__ = ["Finding", "Placement", "placements", "sweep", "where"]
