"""Cluster spec: node groups with the region, zone, group and market Ray labels them with.

A node group is written once here; the local cluster starts from it and the KubeRay
and launcher manifests are checked against it (one source of truth per fact).
"""

from __future__ import annotations

import re
from enum import Enum

from pydantic import Field, field_validator, model_validator

from mlplatform.config import Spec

# Ray's standard node label keys (set by `ray start` from the RAY_NODE_* variables,
# exactly as KubeRay sets them on its pods).
REGION_LABEL = "ray.io/availability-region"
ZONE_LABEL = "ray.io/availability-zone"
GROUP_LABEL = "ray.io/node-group"
MARKET_LABEL = "ray.io/market-type"
# Ray detects ray.io/accelerator-type on real GPU nodes and reserves the ray.io/
# prefix, so a declared accelerator is also published under our own key.
DECLARED_ACCELERATOR_LABEL = "mlplatform.io/accelerator-type"

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?/)?[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
# `ray start` hands this range to worker processes by default (--min/--max-worker-port).
_WORKER_PORTS = (10002, 19999)
_RESERVED_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class Market(str, Enum):
    """How a node is bought: spot nodes can be preempted at any time."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"


class Autoscaling(Spec):
    """Bounds within which Ray's autoscaler grows and shrinks a worker group."""

    min_workers: int = Field(0, ge=0, le=64, description="Nodes the group never shrinks below (0: all may go when idle).")
    max_workers: int = Field(ge=1, le=64, description="Nodes the group never grows above.")

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers}), so the group can never "
                "hold its minimum; raise max_workers or lower min_workers"
            )
        return self


class NodeGroup(Spec):
    """A set of identical nodes: same resources, same place, same market."""

    name: str = Field(description="Group name; becomes the `ray.io/node-group` label. Lowercase letters, digits, '-'.")
    count: int = Field(1, ge=1, le=16, description="Number of nodes in the group.")
    cpus: int = Field(ge=0, le=256, description="Logical CPUs Ray may schedule on each node.")
    gpus: int = Field(0, ge=0, le=16, description="GPUs on each node (0 for CPU-only nodes).")
    memory_gb: float = Field(gt=0, le=4096, description="Memory Ray may schedule on each node, in GiB.")
    object_store_gb: float = Field(
        0.5, gt=0, le=1024, description="Shared-memory object store per node, in GiB."
    )
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per node, e.g. {spot_slot: 1}."
    )
    region: str = Field(description="Cloud region, e.g. me-central-1 (UAE); becomes `ray.io/availability-region`.")
    zone: str = Field(description="Availability zone within the region; becomes `ray.io/availability-zone`.")
    market: Market = Field(Market.ON_DEMAND, description="`spot` or `on-demand`; becomes `ray.io/market-type`.")
    accelerator_type: str | None = Field(
        None, description="Accelerator model, e.g. H100; published as `mlplatform.io/accelerator-type`."
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra node labels; keys may not use Ray's reserved `ray.io/` prefix.",
    )
    autoscaling: Autoscaling | None = Field(
        None,
        description="Let Ray's autoscaler launch and remove this group's nodes within these bounds (worker groups "
        "only); `count` is then ignored. Without it the group has exactly `count` nodes.",
    )
    instance_type: str | None = Field(
        None,
        description="Cloud instance type of each node, e.g. p5.48xlarge; the VM launcher render needs it for every "
        "group.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must start with a lowercase letter and hold only a-z, 0-9 and '-' (max 40)")
        return v

    @field_validator("region", "zone")
    @classmethod
    def _place(cls, v: str) -> str:
        if not _LABEL_VALUE.match(v) or not v:
            raise ValueError("must be a non-empty label value: letters, digits, '.', '_' or '-'")
        return v

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for key, amount in v.items():
            if key in _RESERVED_RESOURCES:
                raise ValueError(f"`{key}` is set by its own field (cpus, gpus, memory_gb, object_store_gb)")
            if amount < 0:
                raise ValueError(f"`{key}` must be >= 0")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if key.startswith("ray.io/"):
                raise ValueError(f"`{key}` uses the `ray.io/` prefix, which Ray reserves; use e.g. `mlplatform.io/`")
            if not _LABEL_KEY.match(key):
                raise ValueError(f"`{key}` is not a valid label key (optional `prefix/` then a name)")
            if not _LABEL_VALUE.match(str(value)):
                raise ValueError(f"value {value!r} of `{key}` is not a valid label value")
        return v

    def node_labels(self) -> dict[str, str]:
        """Every label a node of this group carries, Ray's standard keys included."""
        labels = {
            GROUP_LABEL: self.name,
            REGION_LABEL: self.region,
            ZONE_LABEL: self.zone,
            MARKET_LABEL: self.market.value,
        }
        if self.accelerator_type:
            labels[DECLARED_ACCELERATOR_LABEL] = self.accelerator_type
        labels.update(self.labels)
        return labels


class Ports(Spec):
    """Head-node ports; each must be free on this machine when the cluster starts."""

    gcs: int = Field(6379, ge=1024, le=65535, description="GCS port: the cluster address is <ip>:<gcs>.")
    dashboard: int = Field(8265, ge=1024, le=65535, description="Dashboard and job API port.")
    client_server: int = Field(10001, ge=1024, le=65535, description="Ray Client server port (ray://).")

    @model_validator(mode="after")
    def _distinct(self) -> "Ports":
        values = {"gcs": self.gcs, "dashboard": self.dashboard, "client_server": self.client_server}
        if len(set(values.values())) != len(values):
            raise ValueError(f"gcs, dashboard and client_server must differ; got {values}")
        for key, port in values.items():
            if _WORKER_PORTS[0] <= port <= _WORKER_PORTS[1]:
                raise ValueError(
                    f"{key} port {port} lies in {_WORKER_PORTS[0]}-{_WORKER_PORTS[1]}, which Ray reserves "
                    "for its worker processes; choose a port outside that range"
                )
        return self


class AutoscalerSettings(Spec):
    """How Ray's autoscaler behaves for the groups that declare `autoscaling:`."""

    idle_timeout_s: float = Field(
        60.0, ge=5, le=86400, description="Seconds a node may sit idle before the autoscaler removes it."
    )
    upscaling_speed: float = Field(
        1.0, gt=0, le=100, description="How many nodes may be pending at once, as a multiple of the running ones."
    )


class ServeSettings(Spec):
    """Ray Serve's cluster-wide switches: environment variables every node gets at `ray start`."""

    throughput_optimized: bool = Field(
        False,
        description="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 on every node: replicas run user code on their event loop "
        "and the router in the main loop, the proxy calls replicas over gRPC, Serve stops writing a stderr line "
        "per request and freezes the garbage collector after start-up. Off by default because it did not win "
        "here: through the same HTTPS proxy, two interleaved pairs on 2 cores (tests/benchmarks/"
        "bench_serve_hop.py, BENCHMARKS.md) gave the digits app 0.98x / 0.87x the requests/s at concurrency 1 "
        "and 0.91x / 0.78x at 8, and a no-op deployment 0.94-1.15x; the proxy hop, which it does not remove, "
        "is most of a request's CPU. Costs if on: blocking user code stalls a replica's loop (the platform runs "
        "models in threads) and Serve's logs reach files only, not stderr. Direct ingress, which 2.60's "
        "throughput mode would also turn on, stays as `direct_ingress` says.",
    )
    direct_ingress: bool = Field(
        False,
        description="RAY_SERVE_ENABLE_DIRECT_INGRESS=1: each ingress replica also serves HTTP(S) itself on a port "
        "of 30000-31000 (same TLS certificate, same API keys and contract), beside the Serve proxy's port, which "
        "still works. Straight to a replica's port the digits app served 4-5x the requests/s of the proxy path at "
        "concurrency 8 on 2 cores (bench_serve_hop.py): the proxy hop is most of a request's CPU. Off by default: "
        "clients must find the replicas' ports (they change when replicas move), Ray 2.60's HAProxy front for "
        "them has no TLS, and every replica stop waits a 30 s drain.",
    )

    def node_env(self) -> dict[str, str]:
        """The variables each node's `ray start` gets (local nodes, KubeRay containers, launcher VMs)."""
        # 2.60's throughput mode turns direct ingress on unless told otherwise: say which, always.
        return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if self.throughput_optimized else "0",
                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if self.direct_ingress else "0",
                # The proxy replays a request whose replica died, then answers 503, never 500 (serve/_proxy.py).
                "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mlplatform.serve._proxy:middlewares"}


class ClusterSpec(Spec):
    """A Ray cluster: one head node and any number of worker node groups."""

    name: str = Field(description="Cluster name; `cluster down --name` and `connect(name)` use it.")
    head: NodeGroup = Field(description="The head node's group (count must be 1).")
    worker_groups: list[NodeGroup] = Field(
        default_factory=list, description="Worker node groups; each starts `count` nodes."
    )
    ports: Ports = Field(default_factory=Ports, description="Head-node ports.")
    residency_policy: str | None = Field(
        None,
        description="Residency policy file (relative to this spec), e.g. ../residency/uae.yaml; every job on the "
        "cluster is placed under it.",
    )
    price_catalog: str | None = Field(
        None,
        description="Price catalog file (relative to this spec), e.g. ../prices/example.yaml; it must price every "
        "node group, and every job's cost ledger is priced from it.",
    )

    autoscaler: AutoscalerSettings = Field(
        default_factory=AutoscalerSettings,
        description="Autoscaler behaviour; applies when some worker group declares `autoscaling:`.",
    )
    serve: ServeSettings = Field(
        default_factory=ServeSettings, description="Ray Serve's cluster-wide switches (throughput_optimized)."
    )
    tls: bool = Field(
        True,
        description="Ray's internal mutual TLS and HTTPS for Serve, from a CA of the cluster's own. `false` only "
        "with a reason: traffic is then plaintext (validate and up warn).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must start with a lowercase letter and hold only a-z, 0-9 and '-' (max 40)")
        return v

    @model_validator(mode="after")
    def _groups(self) -> "ClusterSpec":
        if self.head.count != 1:
            raise ValueError(f"head.count must be 1 (a cluster has one head); got {self.head.count}")
        if self.head.autoscaling is not None:
            raise ValueError("head.autoscaling is not allowed: the head node is always there; autoscale worker groups")
        names = [self.head.name] + [g.name for g in self.worker_groups]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"node group names must be unique; repeated: {', '.join(duplicates)}")
        return self

    def groups(self) -> list[NodeGroup]:
        """Head group first, then worker groups in file order."""
        return [self.head, *self.worker_groups]

    def autoscaled(self) -> bool:
        """Whether Ray's autoscaler manages some worker group."""
        return any(g.autoscaling is not None for g in self.worker_groups)

    def regions(self) -> set[str]:
        """Every region some node of this cluster sits in."""
        return {g.region for g in self.groups()}
