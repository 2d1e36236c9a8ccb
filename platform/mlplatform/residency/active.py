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
from mlplatform.residency.policy import ResidencyPolicy

POLICY_ENV = "MLPLATFORM_RESIDENCY_POLICY"
# Which cluster this process works for: set on every node by `cluster up`, and by connect().
CLUSTER_ENV = "MLPLATFORM_CLUSTER"
KV_NAMESPACE = "mlplatform"
KV_KEY = "residency/policy"


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

    Inside the cluster, the node's environment; outside, the GCS (needs ray.init first).
    """
    text = os.environ.get(POLICY_ENV)
    if not text:
        import ray

        if not ray.is_initialized():
            return None
        from ray.experimental import internal_kv

        raw = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        text = raw.decode() if raw else None
    if not text:
        return None
    try:
        return ResidencyPolicy.model_validate(json.loads(text))
    except ValueError as e:
        raise ResidencyError(
            f"The cluster's residency policy ({POLICY_ENV} or the GCS key {KV_KEY}) is unreadable ({e}); "
            "restart the cluster with `mlplatform cluster up` so it is set again."
        ) from None


def record(kind: str, **fields: Any) -> None:
    """Append one record to the cluster's audit trail (see audit.py); a no-op off a known cluster."""
    from mlplatform.residency import audit as trail

    name = os.environ.get(CLUSTER_ENV)
    if name:
        trail.append(trail.default_path(name), kind, **fields)


def _publish_main() -> None:
    """`python -m mlplatform.residency.active GCS_ADDRESS < policy.json`: what `cluster up` runs,
    in a child process holding the cluster's token, so `up` itself keeps no Ray client state."""
    import sys

    publish(sys.argv[1], ResidencyPolicy.model_validate(json.loads(sys.stdin.read())))


if __name__ == "__main__":
    _publish_main()
