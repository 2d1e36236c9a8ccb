"""Typed view of the live cluster's nodes: what residency, cost and placement reason about."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from mlplatform._internal import placement
from mlplatform.cluster.spec import GROUP_LABEL, MARKET_LABEL, REGION_LABEL, ZONE_LABEL


@dataclass(frozen=True)
class Node:
    """One Ray node: its id, labels, total resources and whether it is alive."""

    node_id: str
    name: str
    address: str
    labels: Mapping[str, str]
    resources: Mapping[str, float]
    alive: bool
    is_head: bool

    @property
    def group(self) -> str:
        return self.labels.get(GROUP_LABEL, "")

    @property
    def region(self) -> str:
        return self.labels.get(REGION_LABEL, "")

    @property
    def zone(self) -> str:
        return self.labels.get(ZONE_LABEL, "")

    @property
    def market(self) -> str:
        return self.labels.get(MARKET_LABEL, "")

    def matches(self, selector: Mapping[str, str]) -> bool:
        """Whether this node satisfies a Ray label selector (`v`, `!v`, `in(a,b)`, `!in(a,b)`)."""
        return placement.matches(self.labels, selector)


def inventory(name: str | None = None) -> list[Node]:
    """Nodes of the connected cluster (or connect to local cluster `name` first), head first."""
    import ray

    from mlplatform.cluster.connect import connect

    if not ray.is_initialized():
        connect(name)
    return from_ray_nodes(ray.nodes())


def from_ray_nodes(raw: list[dict[str, Any]]) -> list[Node]:
    """Typed nodes from `ray.nodes()` records, head first, then by group and name."""
    nodes = [
        Node(
            node_id=n["NodeID"],
            name=n.get("NodeName") or n.get("NodeManagerAddress", ""),
            address=n.get("NodeManagerAddress", ""),
            labels=MappingProxyType(dict(n.get("Labels") or {})),
            resources=MappingProxyType(_public_resources(n.get("Resources") or {})),
            alive=bool(n.get("Alive")),
            is_head=bool(n.get("IsHeadNode"))
            or any(k.startswith("node:__internal_head__") for k in (n.get("Resources") or {})),
        )
        for n in raw
    ]
    return sorted(nodes, key=lambda n: (not n.is_head, not n.alive, n.group, n.name))


def _public_resources(resources: Mapping[str, float]) -> dict[str, float]:
    # Ray adds one `node:<ip>` resource per node; it says nothing a user sized.
    return {k: v for k, v in resources.items() if not k.startswith("node:")}
