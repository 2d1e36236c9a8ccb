"""Run a task on every node group and report where each ran: proof that placement works."""

from __future__ import annotations

from typing import Any

from mlplatform.cluster.spec import GROUP_LABEL


def _where_am_i() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return {"node_id": node_id, "node_name": node.get("NodeName", ""), "labels": dict(node.get("Labels") or {})}


def probe_node_groups(timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """One tiny task per alive node group, pinned by its `ray.io/node-group` label.

    Returns, per group, the node the task actually ran on and that node's labels.
    """
    import ray

    from mlplatform.cluster.inventory import from_ray_nodes

    groups = sorted({n.group for n in from_ray_nodes(ray.nodes()) if n.alive and n.group})
    task = ray.remote(num_cpus=0)(_where_am_i)
    refs = [task.options(label_selector={GROUP_LABEL: g}).remote() for g in groups]
    results = ray.get(refs, timeout=timeout_s)
    for group, result in zip(groups, results):
        result["asked_for_group"] = group
    return results
