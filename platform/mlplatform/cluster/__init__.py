"""Clusters: local multi-node clusters, connecting with token auth, and the node inventory."""

from mlplatform.cluster.connect import authenticate, cluster_env, connect
from mlplatform.cluster.inventory import Node, inventory
from mlplatform.cluster.local import LocalCluster, down, find, running, up
from mlplatform.cluster.spec import ClusterSpec, Market, NodeGroup

__all__ = [
    "ClusterSpec",
    "LocalCluster",
    "Market",
    "Node",
    "NodeGroup",
    "authenticate",
    "cluster_env",
    "connect",
    "down",
    "find",
    "inventory",
    "running",
    "up",
]
