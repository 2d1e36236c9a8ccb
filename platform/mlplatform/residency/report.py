"""The residency report: where each job ran and where each model version was trained and is stored.

The evidence an auditor asks for, from two records the platform keeps anyway: the cluster's
audit trail (placements, where each job's processes ran, denials) and the model registry
(each version's classification, training regions and nodes, storage location).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlplatform.errors import ResidencyError
from mlplatform.residency import audit

# Audit record kinds that say something about a job's placement.
_JOB_KINDS = ("placement", "ran", "denial", "violation")


def jobs(trail: str | os.PathLike[str], job_id: str | None = None) -> list[dict[str, Any]]:
    """Every job in the audit trail at `trail` (or only `job_id`): what it was, its classification,
    the selector it was placed with, the regions and node ids it ran on, and any denials.

    A missing trail holds no jobs. Regions and node ids are those the job's processes reported
    (`ran` records) or its placements named; empty when none was recorded.

    Raises:
        ResidencyError: `job_id` is not in the trail (the message lists the jobs that are).
        AuditError: the trail is damaged.
    """
    found: dict[str, dict[str, Any]] = {}
    if Path(trail).is_file():
        for record in audit.read(trail):
            if record.get("kind") not in _JOB_KINDS:
                continue
            # Work placed outside a job (none today) is still reported, under what it was.
            key = record.get("job_id") or f"{record.get('what', '?')}:{record.get('name', '?')}"
            # Ray numbers jobs afresh each time a cluster starts: a session the writer has not seen
            # before starts a new job of the same id (its earlier namesake stays in the report).
            session = record.get("cluster_session")
            if key in found and session and found[key].setdefault("cluster_session", session) != session:
                earlier = found.pop(key)
                found[f"{key}@{earlier['first_at']}"] = earlier
            job = found.setdefault(key, {
                "job_id": key, "placements": [], "classification": None, "regions": [], "node_ids": [],
                "denials": [], "violations": [], "first_at": record["at"], "cluster_session": session,
            })
            regions = record.get("regions") or ([record["region"]] if record.get("region") else [])
            nodes = record.get("node_ids") or ([record["node_id"]] if record.get("node_id") else [])
            job["regions"] = sorted({*job["regions"], *regions})
            job["node_ids"] = sorted({*job["node_ids"], *nodes})
            if record["kind"] == "placement":
                job["placements"].append({k: record.get(k) for k in ("what", "name", "classification", "policy",
                                                                      "selector", "at")})
                job["classification"] = job["classification"] or record.get("classification")
            elif record["kind"] == "denial":
                job["denials"].append({k: record.get(k) for k in ("what", "name", "reason", "at")})
            elif record["kind"] == "violation":  # a process the guard stopped, or the sweep found, outside
                job["violations"].append({k: record.get(k) for k in ("what", "name", "node_id", "region", "reason", "at")})
    if job_id is None:
        return list(found.values())
    if job_id not in found:
        known = ", ".join(found) or "none"
        raise ResidencyError(
            f"Got {job_id!r} for `--job`; the audit trail {trail} has no record of it (jobs recorded: {known}). "
            f"Pass a job id as `ray job list` or the trail shows it, or the cluster it ran on with `--name`."
        )
    return [found[job_id]]


def versions(root: str | os.PathLike[str] | None = None, ref: str | None = None) -> list[dict[str, Any]]:
    """Every version in the registry at `root` (or only `ref`, e.g. 'name@production'): its
    classification, where it was trained (regions, Ray node ids, job) and where it is stored.

    Raises:
        RegistryError and its kinds (ModelNotFound, VersionNotFound, AliasNotFound, ...).
    """
    from mlplatform import registry

    if ref is not None:
        chosen = [registry.resolve(ref, root=root)]
    else:
        chosen = [v for name in registry.list_models(root=root) for v in registry.list_versions(name, root=root)]
    aliases = {name: registry.list_aliases(name, root=root) for name in {v.name for v in chosen}}
    return [
        {
            "ref": v.ref,
            "model": v.name,
            "version": v.version,
            "aliases": sorted(a for a, n in aliases[v.name].items() if n == v.version),
            "classification": v.lineage.classification,
            "training_regions": v.lineage.training_regions,
            "training_node_ids": v.lineage.training_node_ids,
            "job_id": v.lineage.job_id,
            "stored_at": v.uri,
            "storage_region": v.lineage.storage_region,
            "exported_from": v.lineage.extra.get("exported_from"),
            "registered_at": v.registered_at,
        }
        for v in chosen
    ]
