"""The runtime guard: every worker process on the cluster checks, as it starts, that its node is
in a region its job's data classification allows, and refuses to run anywhere else.

Placement (label selectors) keeps work home when every path passes the selector; the guard
catches the paths that do not (a library that drops it, a user who strips it). It runs as Ray's
worker process setup hook, which Ray runs in a worker process before it takes its first task or
actor, Ray Train's, Ray Data's and Serve's internal ones included. A hook that raises makes Ray
end the worker: its task fails (WorkerCrashedError) or its actor dies, with the guard's message
as the exit detail.

How every job gets it without asking: `cluster up` sets Ray's hook variable in every node's
environment (`node_env`), which every worker process the node starts inherits: no runtime_env is
involved, so workers start as fast as without it (a runtime_env would route every worker start
through Ray's runtime-env agent). A job cannot swap it out either: RAY_RUNTIME_ENV_HOOK, also set
on every node, refuses a driver's own `worker_process_setup_hook` (`runtime_env_hook`), and
`connect()` does the same for drivers outside.

Which classification: MLPLATFORM_CLASSIFICATION in the worker's environment (a job's or an
actor's runtime_env), else the one the job's driver declared in the GCS (`declare`), else the
policy's default. This module is imported by every worker process, so it imports only the
standard library until it has to record a violation.
"""

from __future__ import annotations

import json
import os
from typing import Any

from mlplatform.residency.names import KV_KEY, KV_NAMESPACE, POLICY_ENV, REGION_LABEL, ZONE_LABEL

CLASSIFICATION_ENV = "MLPLATFORM_CLASSIFICATION"
SETUP_HOOK = "mlplatform.residency.guard.check_this_worker"
# Ray calls the hook named here in every driver's ray.init (ray_constants.RAY_RUNTIME_ENV_HOOK).
RUNTIME_ENV_HOOK_ENV = "RAY_RUNTIME_ENV_HOOK"
RUNTIME_ENV_HOOK = "mlplatform.residency.guard.runtime_env_hook"
JOB_KEY = "residency/job/{job_id}"


def node_env() -> dict[str, str]:
    """What `cluster up` adds to every node's environment so that every worker runs the guard."""
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    return {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: SETUP_HOOK, RUNTIME_ENV_HOOK_ENV: RUNTIME_ENV_HOOK}


def runtime_env_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
    """A driver's runtime_env, checked: an own worker_process_setup_hook is refused (Ray runs one
    per worker, and it would replace the guard the node gives every worker)."""
    own = (runtime_env or {}).get("worker_process_setup_hook")
    if own not in (None, SETUP_HOOK):
        from mlplatform.errors import ResidencyError

        raise ResidencyError(
            f"Got {own!r} for runtime_env `worker_process_setup_hook`; on this cluster that hook is the residency "
            f"guard ({SETUP_HOOK}). Run your setup code at the start of your tasks instead."
        )
    return runtime_env


def outside(policy: dict[str, Any], classification: str, nodes: dict[str, dict[str, str]]) -> dict[str, str]:
    """Node id → why, for each of `nodes` (id → labels) where `classification` work may not be."""
    found = {node: violation(policy, classification, labels) for node, labels in nodes.items()}
    return {node: why for node, why in found.items() if why}


def declare(classification: str) -> None:
    """Record in the GCS the classification of the connected driver's job, for its workers' guard."""
    import ray
    from ray.experimental import internal_kv

    job_id = ray.get_runtime_context().get_job_id()
    internal_kv._internal_kv_put(JOB_KEY.format(job_id=job_id), classification, overwrite=True,
                                 namespace=KV_NAMESPACE)


def declared(job_id: str) -> str | None:
    """The classification a job's driver declared (None: none; needs a connected Ray)."""
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(JOB_KEY.format(job_id=job_id), namespace=KV_NAMESPACE)
    return raw.decode() if raw else None


def violation(policy: dict[str, Any], classification: str | None, labels: dict[str, str]) -> str | None:
    """Why a process on a node with `labels` may not do `classification` work (None: it may).

    `policy` is the policy's JSON (ResidencyPolicy.to_json()); an unknown classification is a
    violation too, since nothing says where its data may go.
    """
    name = classification or policy["default_classification"]
    rule = policy["classifications"].get(name)
    if rule is None:
        return f"classification {name!r} is not in residency policy {policy['name']!r}"
    region, zone = labels.get(REGION_LABEL), labels.get(ZONE_LABEL)
    if rule["regions"] != ["*"] and region not in rule["regions"]:
        return (f"{name!r} work may only run in regions {', '.join(rule['regions'])} (residency policy "
                f"{policy['name']!r}); this node is in region {region or '(none)'}")
    if rule.get("zones") and zone not in rule["zones"]:
        return (f"{name!r} work may only run in zones {', '.join(rule['zones'])} (residency policy "
                f"{policy['name']!r}); this node is in zone {zone or '(none)'}")
    return None


def check_this_worker() -> None:
    """Ray's worker_process_setup_hook: refuse to start this worker outside its allowed regions."""
    if not os.environ.get(POLICY_ENV):
        return  # a cluster started without a residency policy
    import ray
    from ray.experimental import internal_kv

    if ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return  # an I/O worker (object spilling and restoring) of no job: it runs no user code

    # The policy in force is the GCS's (`residency apply` may have changed it since the node started).
    text = internal_kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE) or os.environ[POLICY_ENV]
    context = ray.get_runtime_context()
    job_id = context.get_job_id()
    classification = os.environ.get(CLASSIFICATION_ENV) or declared(job_id)
    _refuse_outside(json.loads(text), classification, context, what="worker", job_id=job_id)


def check_driver(policy: Any, classification: str | None) -> None:
    """The same check for a job's driver (its node, not its workers'); needs a connected Ray.

    The driver reads restricted data and, with Ray Train, its node also hosts the Train controller.
    """
    import ray

    context = ray.get_runtime_context()
    _refuse_outside(policy.to_json(), classification, context, what="driver", job_id=context.get_job_id())


def _refuse_outside(policy: dict[str, Any], classification: str | None, context: Any, *, what: str,
                    job_id: str | None) -> None:
    labels = context.get_node_labels()
    why = violation(policy, classification, labels)
    if why is None:
        return
    from mlplatform.errors import ResidencyError
    from mlplatform.residency import writer

    node_id = context.get_node_id()
    # Left in the GCS for the cluster's audit writer: a worker in its setup hook cannot call an actor.
    writer.leave("violation", {"what": what, "job_id": job_id, "node_id": node_id, "region": labels.get(REGION_LABEL),
                               "classification": classification or policy["default_classification"], "reason": why})
    raise ResidencyError(
        f"Residency guard stopped this {what} (job {job_id}, node {node_id}): {why}. The work was placed "
        f"outside its regions (a missing or stripped label selector); place it with the policy's selector "
        f"(`mlplatform residency check`) or classify the data correctly."
    )
