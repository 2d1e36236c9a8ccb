"""Ray's autoscaler on a local cluster: node groups that grow and shrink on one machine.

`cluster up` starts the head with autoscaler v2 and Ray's fake multi-node provider, which
launches a "node" as a set of Ray processes on this machine, exactly as a cloud provider
would launch a VM. The autoscaling config is rendered here from the cluster spec (Ray
2.60's wheel lacks the fake provider's example.yaml). Every worker group is a node type:
an autoscaled group within its bounds, a fixed group with `count` as both bounds.

The provider starts a launched node's processes from the head's autoscaler (monitor)
process, so they inherit the head's environment (token, residency policy) and its process
group: stopping the head's group stops them too. They also inherit the head's RAY_NODE_*
variables, so each node type carries all of Ray's standard labels explicitly; the provider
hands them to the node as autoscaler override labels, which take precedence.
"""

from __future__ import annotations

from typing import Any

from mlplatform.cluster.spec import ClusterSpec, NodeGroup

# Fixed by the fake provider: the head's node id and node type name.
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
FAKE_HEAD_NODE_TYPE = "ray.head.default"
_GIB = 2**30


def head_env() -> dict[str, str]:
    """What the head's `ray start` needs to run autoscaler v2 with the fake provider."""
    return {
        "RAY_FAKE_CLUSTER": "1",
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
        # Seconds between autoscaler rounds (default 5): demand is seen sooner.
        "AUTOSCALER_UPDATE_INTERVAL_S": "2",
    }


def bounds(group: NodeGroup) -> tuple[int, int]:
    """(min, max) nodes of a worker group: its autoscaling bounds, else exactly `count`."""
    if group.autoscaling is None:
        return group.count, group.count
    return group.autoscaling.min_workers, group.autoscaling.max_workers


def settings(spec: ClusterSpec) -> dict[str, Any]:
    """The top-level autoscaler settings of a Ray cluster config (local fake provider or VM launcher)."""
    return {
        "cluster_name": spec.name,
        "max_workers": sum(bounds(g)[1] for g in spec.worker_groups),
        "upscaling_speed": spec.autoscaler.upscaling_speed,
        "idle_timeout_minutes": spec.autoscaler.idle_timeout_s / 60,
    }


def render_fake_provider_config(spec: ClusterSpec, gcs_address: str) -> dict[str, Any]:
    """The autoscaling config the head's autoscaler reads, for the cluster at `gcs_address`."""
    node_types: dict[str, Any] = {FAKE_HEAD_NODE_TYPE: {"resources": {}, "node_config": {}, "max_workers": 0}}
    for group in spec.worker_groups:
        low, high = bounds(group)
        node_types[group.name] = {
            "resources": _resources(group),
            "labels": group.node_labels(),
            "node_config": {},
            "min_workers": low,
            "max_workers": high,
        }
    return {
        **settings(spec),
        "provider": {
            # The fake provider by its class: as `type: fake_multinode` the autoscaler would
            # read its defaults from the example.yaml the wheel lacks.
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "launch_multiple": True,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "docker": {},
        "auth": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _resources(group: NodeGroup) -> dict[str, float]:
    # No `memory`: the provider would pass it on as a custom resource. A launched node
    # reports the memory it detects.
    resources: dict[str, float] = {"CPU": group.cpus, "object_store_memory": int(group.object_store_gb * _GIB)}
    if group.gpus:
        resources["GPU"] = group.gpus
    resources.update(group.resources)
    return resources
