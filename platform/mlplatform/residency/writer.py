"""One writer for a cluster's audit trail, so that records from every machine form one chain.

The trail is a file on the head node's disk. A process on another machine (a worker the guard
stops, a driver submitted elsewhere) cannot append to it, and a trail per machine would be
several chains an auditor has to merge and cannot check against each other. So every process
connected to Ray sends its records to one detached actor on the head node, which appends them
under the file lock; processes not connected to Ray (`cluster up`, the CLI before it connects)
append directly, on the machine they run on, which for those is the head's.

A worker the runtime guard stops cannot call an actor (inside Ray's worker setup hook that
crashes the process), so it leaves its record in the GCS key-value store (`leave`); the writer
moves such records into the trail before each record it appends, and on `flush`, which the
`residency` commands run before they read the trail.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

from mlplatform.residency import _metrics
from mlplatform.residency.names import KV_NAMESPACE

WRITER_NAME = "audit-writer"
TIMEOUT_S = 60.0
PENDING = "residency/pending/"


class AuditWriter:
    """The actor: appends records to the cluster's trail on the head node's disk."""

    def __init__(self, cluster: str) -> None:
        from mlplatform.residency import audit

        self.path = audit.default_path(cluster)
        # The writer lives as long as the cluster: its id tells the trail's records of one cluster
        # start from another's (Ray numbers jobs afresh at each start).
        self.session = uuid.uuid4().hex[:12]

    def append(self, kind: str, fields: dict[str, Any]) -> int:
        from mlplatform.residency import audit

        self.flush()
        seq = audit.append(self.path, kind, **fields, cluster_session=self.session)["seq"]
        _metrics.count(kind, fields)  # after the append: the trail, not the metric, is the record
        return seq

    def flush(self) -> int:
        """Move the records processes left in the GCS into the trail, oldest first; how many."""
        from ray.experimental import internal_kv

        from mlplatform.residency import audit

        keys = sorted(internal_kv._internal_kv_list(PENDING, namespace=KV_NAMESPACE))
        for key in keys:
            raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
            if raw:
                left = json.loads(raw)
                audit.append(self.path, left["kind"], **left["fields"], cluster_session=self.session)
                _metrics.count(left["kind"], left["fields"])
            internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
        return len(keys)


def leave(kind: str, fields: dict[str, Any]) -> None:
    """Leave a record in the GCS for the writer to append (for a process that cannot call an actor)."""
    from ray.experimental import internal_kv

    key = f"{PENDING}{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}"
    record = {"kind": kind, "fields": {**fields, "from_host": socket.gethostname(), "from_pid": os.getpid()}}
    internal_kv._internal_kv_put(key, json.dumps(record), overwrite=True, namespace=KV_NAMESPACE)


def flush(cluster: str) -> int:
    """Have the writer move records left in the GCS into the trail (needs a connected Ray)."""
    import ray

    return ray.get(_writer(cluster).flush.remote(), timeout=TIMEOUT_S)


def send(cluster: str, kind: str, fields: dict[str, Any]) -> int:
    """Append through the cluster's writer (started on the head node on first use); the record's seq.

    The record also names the process it came from (`from_host`, `from_pid`): the trail's own
    `host` and `pid` are the writer's.
    """
    import ray

    origin = {"from_host": socket.gethostname(), "from_pid": os.getpid()}
    return ray.get(_writer(cluster).append.remote(kind, {**fields, **origin}), timeout=TIMEOUT_S)


def _writer(cluster: str) -> Any:
    """The cluster's writer actor, started on the head node by whoever needs it first."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(AuditWriter).options(
        name=WRITER_NAME, namespace=KV_NAMESPACE, lifetime="detached", get_if_exists=True,
        label_selector={"ray.io/node-id": _head_node_id()},
    ).remote(cluster)


def _head_node_id() -> str:
    import ray

    from mlplatform.cluster.inventory import from_ray_nodes

    return next(n.node_id for n in from_ray_nodes(ray.nodes()) if n.alive and n.is_head)
