"""Render a cluster spec as a Ray VM launcher config (`ray up`) on AWS.

Same spec, same groups, same labels as the local cluster and the KubeRay manifests: each
node group becomes a node type whose `labels:` carry every label its nodes get (the
autoscaler matches pending label selectors against them and hands them to `ray start`),
an autoscaled group keeps its bounds and a fixed one has `count` as both. One launcher
config drives one provider region, so the spec's groups must share the head's region.

Every node starts with token auth (the token file travels with `file_mounts`), the
cluster's residency policy and the residency guard in its environment, and Ray's metrics
on port 8080 for Prometheus. With TLS (the spec's default) the cluster's CA travels with
`file_mounts` too and each VM signs its own certificate for its address at setup
(tls.sign_script), then starts with Ray's mutual TLS.
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from mlplatform import residency
from mlplatform.cluster import tls
from mlplatform.cluster.autoscaler import bounds, settings
from mlplatform.cluster.spec import ClusterSpec, Market, NodeGroup
from mlplatform.errors import SpecError
from mlplatform.residency import guard

if TYPE_CHECKING:
    from mlplatform.residency import ResidencyPolicy

RAY_VERSION = "2.60.0"
# Ray's AWS provider knows no default AMI for me-central-1: resolve AWS's Deep Learning AMI
# (NVIDIA driver, Ubuntu 22.04) from its public SSM parameter at launch, which EC2 accepts as ImageId.
DEFAULT_IMAGE_ID = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
# Where each node finds the token and the platform's source (both copied by `ray up`).
_REMOTE_TOKEN = "~/mlplatform/auth_token"
_REMOTE_SRC = "~/mlplatform/src"
_REMOTE_CA = "~/mlplatform/ca"  # ca.crt and ca.key, for each VM to sign its own certificate
_REMOTE_TLS = "~/mlplatform/tls"
_GCS_PORT = 6379
_METRICS_PORT = 8080
_GIB = 2**30


def default_token_file(spec: ClusterSpec) -> str:
    """Where `ray up` reads the cluster's token by default (create it before `ray up`)."""
    return f"~/.mlplatform/tokens/{spec.name}"


def default_tls_dir(spec: ClusterSpec) -> str:
    """Where `ray up` reads the cluster's CA by default: what `mlplatform cluster up` made for it."""
    return f"~/.mlplatform/clusters/{spec.name}/tls"


def render_launcher(
    spec: ClusterSpec, policy: ResidencyPolicy | None = None, image_id: str = DEFAULT_IMAGE_ID,
    token_file: str | None = None, tls_dir: str | None = None,
) -> dict[str, Any]:
    """The `ray up` config of `spec` on AWS, valid against Ray's ray-schema.json.

    Raises:
        SpecError: a group has no `instance_type`, lies outside the head's region, or has a
            fractional custom resource (node types take whole units).
    """
    _check(spec)
    region = spec.head.region
    env = {residency.CLUSTER_ENV: spec.name, "RAY_AUTH_MODE": "token", **spec.serve.node_env()}
    if policy is not None:
        env[residency.POLICY_ENV] = residency.encode(policy)
        env.update(guard.node_env())
    # The token path unquoted, so that the shell expands its `~`.
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + f" RAY_AUTH_TOKEN_PATH={_REMOTE_TOKEN}"
    file_mounts = {_REMOTE_TOKEN: token_file or default_token_file(spec), _REMOTE_SRC: "."}
    setup = ["chmod 600 " + _REMOTE_TOKEN]
    if spec.tls:
        source = tls_dir or default_tls_dir(spec)
        file_mounts.update({f"{_REMOTE_CA}/{f}": f"{source}/{f}" for f in ("ca.crt", "ca.key")})  # not the local nodes' keys
        # The VM's own key and certificate for its private address (setup commands run on every VM).
        setup += [
            f"mkdir -p {_REMOTE_TLS} && chmod 700 {_REMOTE_TLS} && "
            + tls.sign_script(_REMOTE_CA, _REMOTE_TLS, ip="\"$(hostname -I | cut -d' ' -f1)\""),
            f"cp {_REMOTE_CA}/ca.crt {_REMOTE_TLS}/ca.crt && chmod 600 {_REMOTE_CA}/ca.key",
        ]
        exports += (f" RAY_USE_TLS=1 RAY_TLS_SERVER_CERT={_REMOTE_TLS}/tls.crt RAY_TLS_SERVER_KEY={_REMOTE_TLS}/tls.key"
                    f" RAY_TLS_CA_CERT={_REMOTE_TLS}/ca.crt")
    common = f"--metrics-export-port={_METRICS_PORT} --disable-usage-stats"
    return {
        **settings(spec),
        "provider": {
            "type": "aws",
            "region": region,
            # Only these zones' subnets; each node type pins its own zone (Placement).
            "availability_zone": ",".join(sorted({g.zone for g in spec.groups()})),
            "cache_stopped_nodes": False,
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            spec.head.name: _node_type(spec.head, image_id, 0, 0),
            **{g.name: _node_type(g, image_id, *bounds(g)) for g in spec.worker_groups},
        },
        "head_node_type": spec.head.name,
        "file_mounts": file_mounts,
        "rsync_exclude": [".git", ".venv", "**/__pycache__"],
        "setup_commands": [
            *setup,
            f"pip install -q 'ray[default]=={RAY_VERSION}' -e {_REMOTE_SRC}",
        ],
        "head_start_ray_commands": [
            "ray stop",
            # Autoscaler v2 honours node types' labels (label-selector-driven launches).
            f"{exports} RAY_enable_autoscaler_v2=1 ray start --head --port={_GCS_PORT} --dashboard-host=0.0.0.0 "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml {common}",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"{exports} ray start --address=$RAY_HEAD_IP:{_GCS_PORT} {common}",
        ],
    }


def _check(spec: ClusterSpec) -> None:
    for field, group in _fields(spec):
        if not group.instance_type:
            example = "g5.xlarge" if group.gpus else "m6i.xlarge"
            raise SpecError(
                f"Got no `{field}.instance_type` (group {group.name!r}); the launcher needs an instance type for "
                f"every group to launch its VMs. Set e.g. `instance_type: {example}` in the spec."
            )
        if group.region != spec.head.region:
            raise SpecError(
                f"Got {group.region!r} for `{field}.region` (group {group.name!r}); one launcher config drives one "
                f"provider region, the head's ({spec.head.region}). Move the group to {spec.head.region} or give "
                "it its own cluster spec."
            )
        for key, amount in group.resources.items():
            if amount != int(amount):
                raise SpecError(
                    f"Got {amount} for `{field}.resources.{key}`; launcher node types take whole resource units. "
                    "Use an integer."
                )


def _fields(spec: ClusterSpec) -> list[tuple[str, NodeGroup]]:
    return [("head", spec.head)] + [(f"worker_groups[{i}]", g) for i, g in enumerate(spec.worker_groups)]


def _node_type(group: NodeGroup, image_id: str, low: int, high: int) -> dict[str, Any]:
    node_config: dict[str, Any] = {
        "InstanceType": group.instance_type,
        "ImageId": image_id,
        "Placement": {"AvailabilityZone": group.zone},
    }
    if group.market == Market.SPOT:
        node_config["InstanceMarketOptions"] = {"MarketType": "spot"}
    resources = {"CPU": group.cpus, "memory": int(group.memory_gb * _GIB)}
    if group.gpus:
        resources["GPU"] = group.gpus
    resources.update({k: int(v) for k, v in group.resources.items()})
    return {
        "node_config": node_config,
        "resources": resources,
        "labels": group.node_labels(),
        "min_workers": low,
        "max_workers": high,
    }
