"""Render a cluster spec as a KubeRay RayCluster manifest: the same node groups, on Kubernetes.

The spec stays the one source of truth: the manifest under cluster_configs/kuberay/ is
this function's output (a test checks they agree, and validates it against the
official CRD). Each group's region and zone become a nodeSelector on Kubernetes'
topology labels, so pods, and the data they touch, stay where the spec puts them; the
RAY_NODE_* variables give Ray the same standard labels the local cluster has.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlplatform import residency
from mlplatform.residency import guard
from mlplatform.cluster.local import _LABEL_ENV
from mlplatform.cluster.spec import ClusterSpec, NodeGroup

if TYPE_CHECKING:
    from mlplatform.residency import ResidencyPolicy

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
# The shared metadata store (PostgreSQL) for every pod, from a Secret so the password is in no
# manifest: kubectl create secret generic mlplatform-metadata --from-literal=url=postgresql://...
METADATA_SECRET = "mlplatform-metadata"
_METADATA_URL = {
    "name": "MLPLATFORM_METADATA_URL",
    "valueFrom": {"secretKeyRef": {"name": METADATA_SECRET, "key": "url", "optional": True}},
}


def render_raycluster(spec: ClusterSpec, image: str = DEFAULT_IMAGE, policy: ResidencyPolicy | None = None) -> dict[str, Any]:
    """A `ray.io/v1` RayCluster with token auth, one worker group per spec group.

    With `policy` (the spec's residency policy), every pod carries it in its environment, as
    `cluster up` gives it to local nodes: every Ray worker process of every job inherits it.
    """
    env = [{"name": residency.CLUSTER_ENV, "value": spec.name}, _METADATA_URL]
    if policy is not None:
        env.append({"name": residency.POLICY_ENV, "value": residency.encode(policy)})
        env += [{"name": name, "value": value} for name, value in guard.node_env().items()]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/managed-by": "mlplatform"}},
        "spec": {
            "rayVersion": RAY_VERSION,
            "authOptions": {"mode": "token"},
            "headGroupSpec": {
                "rayStartParams": {**_start_params(spec.head), "dashboard-host": "0.0.0.0"},
                **_group_fields(spec.head),
                "template": _pod(spec.head, image, "ray-head", env),
            },
            "workerGroupSpecs": [
                {
                    "groupName": group.name,
                    "replicas": group.count,
                    "minReplicas": group.count,
                    "maxReplicas": group.count,
                    "rayStartParams": _start_params(group),
                    **_group_fields(group),
                    "template": _pod(group, image, "ray-worker", env),
                }
                for group in spec.worker_groups
            ],
        },
    }


def _start_params(group: NodeGroup) -> dict[str, str]:
    return {"num-cpus": str(group.cpus), "num-gpus": str(group.gpus)}


def _group_fields(group: NodeGroup) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    custom_labels = {k: v for k, v in group.node_labels().items() if k not in _LABEL_ENV}
    if custom_labels:
        fields["labels"] = custom_labels
    if group.resources:
        fields["resources"] = {k: str(v) for k, v in group.resources.items()}
    return fields


def _pod(group: NodeGroup, image: str, container: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    limits = {"cpu": str(group.cpus), "memory": f"{_mib(group.memory_gb + group.object_store_gb)}Mi"}
    if group.gpus:
        limits["nvidia.com/gpu"] = str(group.gpus)
    labels = group.node_labels()
    return {
        "spec": {
            "nodeSelector": {
                "topology.kubernetes.io/region": group.region,
                "topology.kubernetes.io/zone": group.zone,
            },
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "env": [{"name": var, "value": labels[label]} for label, var in _LABEL_ENV.items()] + env,
                    "resources": {"limits": limits, "requests": dict(limits)},
                }
            ],
        }
    }


def _mib(gib: float) -> int:
    return int(round(gib * 1024))
