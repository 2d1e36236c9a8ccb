"""The policy a cluster runs under: set by `cluster up`, read by every job on the cluster.

`cluster up` loads the policy its spec names, checks it against the cluster's regions before
starting anything, and hands it to every node twice: in the node's environment (so every Ray
worker process on it, of every job, inherits it and cannot lose it by omitting a flag) and in
the GCS key-value store (so a driver outside the cluster, connected with ray.init, reads it too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlplatform import config
from mlplatform.errors import ResidencyError, SpecError
from mlplatform.residency.names import CLUSTER_ENV, KV_KEY, KV_NAMESPACE, POLICY_ENV
from mlplatform.residency.policy import ResidencyPolicy



def load(path: str | os.PathLike[str], regions: set[str] | None = None) -> ResidencyPolicy:
    """Read a policy file; with `regions`, also check it names only regions the cluster has."""
    policy = config.load(path, ResidencyPolicy)
    if regions is not None:
        policy.check_regions(regions)
    return policy


def for_cluster_spec(spec: Any, spec_path: str | os.PathLike[str] | None) -> ResidencyPolicy | None:
    """The policy a cluster spec names (its path is relative to the spec file), checked against it."""
    if not spec.residency_policy:
        return None
    base = Path(spec_path).parent if spec_path else Path.cwd()
    path = (base / spec.residency_policy).resolve()
    try:
        return load(path, spec.regions())
    except SpecError as e:
        raise SpecError(f"residency_policy of cluster {spec.name!r}: {e}") from None


def encode(policy: ResidencyPolicy) -> str:
    return json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":"))


def publish(gcs_address: str, policy: ResidencyPolicy) -> None:
    """Put the policy in the cluster's GCS key-value store (the caller holds the cluster's token)."""
    from ray._raylet import GcsClient

    GcsClient(address=gcs_address).internal_kv_put(KV_KEY.encode(), encode(policy).encode(), True,
                                                   KV_NAMESPACE.encode())


def current() -> ResidencyPolicy | None:
    """The policy of the cluster this process runs on or is connected to (None: the cluster has none).

    The GCS holds the policy in force (`apply` changes it there); a node's environment holds the
    one the cluster started with, for processes not connected to Ray.
    """
    import ray

    text = None
    if ray.is_initialized():
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        text = raw.decode() if raw else None
    text = text or os.environ.get(POLICY_ENV)
    if not text:
        return None
    try:
        return ResidencyPolicy.model_validate(json.loads(text))
    except ValueError as e:
        raise ResidencyError(
            f"The cluster's residency policy ({POLICY_ENV} or the GCS key {KV_KEY}) is unreadable ({e}); "
            "restart the cluster with `mlplatform cluster up` so it is set again."
        ) from None


def apply(policy: ResidencyPolicy) -> ResidencyPolicy:
    """Make `policy` the connected cluster's policy; returns the one it replaces.

    Refused while a job that declared a classification runs and the new policy changes that
    classification's rule: its workers already placed, and the data already written, followed the
    old one. New workers (their guard reads the GCS) and new jobs follow the new policy.

    Raises:
        ResidencyError: the cluster has no policy, the policy names a region the cluster lacks, or
            restricted work runs under a rule the new policy changes.
    """
    import ray
    from ray.experimental import internal_kv

    from mlplatform import access
    from mlplatform.cluster.inventory import from_ray_nodes
    from mlplatform.residency import guard

    access.require("residency.policy.apply")
    old = current()
    if old is None:
        raise ResidencyError(
            "This cluster was started without a residency policy, so its nodes run no residency guard; name the "
            "policy in the cluster spec (`residency_policy:`) and start it again with `mlplatform cluster up`."
        )
    policy.check_regions({n.region for n in from_ray_nodes(ray.nodes()) if n.alive and n.region})
    own = ray.get_runtime_context().get_job_id()
    affected = []
    for job_id in _running_jobs():
        name = guard.declared(job_id) if job_id != own else None
        if name and old.classifications.get(name) != policy.classifications.get(name):
            affected.append(f"{job_id} ({name})")
    if affected:
        record("denial", what="policy", policy=policy.name, reason=f"running: {', '.join(affected)}")
        raise ResidencyError(
            f"Got policy {policy.name!r}; it changes the rules of classifications that running job(s) "
            f"{', '.join(affected)} work under. Wait until they finish (`ray job list`) or stop them, then apply it."
        )
    internal_kv._internal_kv_put(KV_KEY, encode(policy), overwrite=True, namespace=KV_NAMESPACE)
    record("policy", old=old.name, new=policy.name, old_sha256=_sha256(encode(old)), new_sha256=_sha256(encode(policy)))
    return old


def _running_jobs() -> list[str]:
    from ray.util.state import list_jobs

    return [j.job_id for j in list_jobs(limit=10_000, raise_on_missing_output=False)
            if j.job_id and str(j.status).rsplit(".", 1)[-1] == "RUNNING"]


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def record(kind: str, **fields: Any) -> None:
    """Append one record to the cluster's audit trail (see audit.py); a no-op off a known cluster.

    A process connected to Ray sends it to the cluster's one writer on the head node (writer.py),
    wherever the process runs; one not connected appends to the file on its own machine.
    """
    from mlplatform.residency import audit as trail

    name = os.environ.get(CLUSTER_ENV)
    if not name:
        return
    import ray

    if ray.is_initialized():
        from mlplatform.residency import writer

        writer.send(name, kind, fields)
    else:
        trail.append(trail.default_path(name), kind, **fields)


def _publish_main() -> None:
    """`python -m mlplatform.residency.active GCS_ADDRESS < policy.json`: what `cluster up` runs,
    in a child process holding the cluster's token, so `up` itself keeps no Ray client state."""
    import sys

    publish(sys.argv[1], ResidencyPolicy.model_validate(json.loads(sys.stdin.read())))


if __name__ == "__main__":
    _publish_main()
