"""build_app: a validated ServeSpec → a Ray Serve application (ingress → model deployments)."""

from __future__ import annotations

import logging
from typing import Any

from mlplatform import config
from mlplatform._internal import placement, storage
from mlplatform import residency
from mlplatform.residency import guard
from mlplatform.errors import ModelNotDeployable, PlacementError, ResidencyError
from mlplatform.serve._contract import Contract
from mlplatform.serve._keys import default_keys_dir
from mlplatform.serve._spec import ModelDeploymentSpec, ServeSpec, Variant

logger = logging.getLogger(__name__)

# Replicas report unhealthy within seconds, so the router's fallback reacts quickly.
_HEALTH = {"health_check_period_s": 2.0, "health_check_timeout_s": 10.0, "graceful_shutdown_timeout_s": 5.0}


def build_app(args: dict[str, Any]):
    """The Serve application for `args` (a ServeSpec as a dict, or a ServeSpec).

    Used by `serve deploy` through `import_path: mlplatform.serve:build_app`, and by
    `serve.run(build_app(...))`. The model reference is pinned to its version number here,
    so every replica serves the same version even if the alias moves meanwhile.

    Raises:
        SpecError: `args` does not fit ServeSpec (every problem listed).
        ModelNotFound, VersionNotFound, AliasNotFound: the reference does not resolve.
        ModelNotDeployable: the version lacks the variant or its export gate failed for it.
        PlacementError: no live node satisfies a deployment's label selector and CPUs.
    """
    spec = args if isinstance(args, ServeSpec) else config.validate(dict(args or {}), ServeSpec, "serve application args")
    return _build(spec)


def _build(spec: ServeSpec):
    from ray import serve

    from mlplatform import registry
    from mlplatform.serve._ingress import Ingress
    from mlplatform.serve._models import model_class

    version = registry.resolve(spec.model, root=spec.registry_root)
    contract = Contract.from_signature(
        version.lineage.input_signature, spec.limits.max_rows, spec.limits.max_payload_bytes, version.ref
    )
    versions = {role: version for role in spec.deployments()}
    if spec.canary:
        versions["canary"] = registry.resolve(spec.canary.model, root=spec.registry_root)
    refs = {role: v.ref for role, v in versions.items()}
    spec, choices = _resolve_auto(spec, versions)
    for role, dep in spec.deployments().items():
        _check_export_gate(versions[role], dep.variant, role)
    policy = residency.current()
    selectors = _selectors(spec, policy)
    _preflight(spec, selectors)
    # Under a policy every replica's worker runs the residency guard, for the app's classification.
    guarded = {"env_vars": {guard.CLASSIFICATION_ENV: policy.resolve(spec.classification)}} if policy else None
    if policy is not None:
        _check_proxies(spec, policy)

    def model_settings(role: str, dep: ModelDeploymentSpec) -> dict[str, Any]:
        return {
            "app": spec.name, "role": role, "ref": refs[role], "root": spec.registry_root, "variant": dep.variant.value,
            "num_cpus": dep.num_cpus, "device": dep.device, "dtype": dep.dtype.value,
            "max_batch_size": dep.batching.max_batch_size, "batch_wait_timeout_s": dep.batching.batch_wait_timeout_s,
            "drift_enabled": spec.drift.enabled, "drift_window_rows": spec.drift.window_rows,
            "drift_alert_psi": spec.drift.alert_psi, "drift_sample_rate": spec.drift.sample_rate,
            "cache_max_bytes": dep.cache.max_bytes if dep.cache.enabled else 0,
        }

    # Serve's per-deployment logging (the access log is one line per request per replica).
    logging_config = {"enable_access_log": spec.logging.access_log, "log_level": spec.logging.level}

    def model(role: str, dep: ModelDeploymentSpec):
        options = _replica_options(selectors[role], dep.num_cpus, dep.num_gpus, dep.replicas, dep.autoscaling, guarded)
        return serve.deployment(model_class(dep.variant.value)).options(
            name=role, max_ongoing_requests=dep.max_ongoing_requests, max_queued_requests=dep.max_queued_requests,
            logging_config=logging_config, user_config=choices[role], **options, **_HEALTH,
        ).bind(model_settings(role, dep))

    ing = spec.ingress
    # Colocated: the primary runs inside the ingress replicas (no model deployment, no hop).
    bound = {} if ing.colocate else {role: model(role, dep) for role, dep in spec.deployments().items()}
    settings = {
        "app": spec.name, "version": version.ref, "canary_version": refs.get("canary"),
        "canary_percent": spec.canary.percent if spec.canary else 0,
        "variants": {role: dep.variant.value for role, dep in spec.deployments().items()},
        "contract": {"input_name": contract.input_name, "dtype": contract.dtype, "features": contract.features,
                     "max_rows": contract.max_rows, "max_payload_bytes": contract.max_payload_bytes},
        "auth": spec.auth.enabled,
        "keys_dir": storage.absolute(spec.auth.keys_dir) if spec.auth.keys_dir else str(default_keys_dir()),
        "retry_after_s": ing.retry_after_s,
        "primary_timeout_s": spec.fallback.primary_timeout_s if spec.fallback else 0,
        # The fallback decision and the canary gate need fresh replica counts; otherwise they only
        # feed the replicas gauge, and serve.status() is not free (about 5% of an ingress's CPU at 1 s).
        "poll_interval_s": 1.0 if "fallback" in spec.deployments() or (spec.canary and spec.canary.gate) else 5.0,
    }
    gate = None
    if spec.canary and spec.canary.gate:
        from mlplatform.serve._canary import CanaryGate

        # One replica: the verdict is taken once, from every ingress replica's outcomes.
        gate_actor = {"num_cpus": 0, **({"label_selector": selectors["gate"]} if selectors["gate"] else {}),
                      **({"runtime_env": guarded} if guarded else {})}
        gate = serve.deployment(CanaryGate).options(
            name="canary_gate", num_replicas=1, ray_actor_options=gate_actor, **_HEALTH,
        ).bind({
            "app": spec.name, "root": spec.registry_root, "gate": spec.canary.gate.model_dump(),
            "canary_ref": refs["canary"], "canary_alias": _alias(spec.canary.model),
            "primary_ref": version.ref, "primary_alias": _alias(spec.model),
        })
    host = spec.primary if ing.colocate else ing  # whose placement and limits the ingress replicas take
    options = _replica_options(selectors["primary" if ing.colocate else "ingress"], host.num_cpus,
                               getattr(host, "num_gpus", 0), host.replicas, host.autoscaling, guarded)
    if ing.colocate:
        settings["local_model"] = model_settings("primary", spec.primary)
    return serve.deployment(Ingress).options(
        name="ingress", max_ongoing_requests=host.max_ongoing_requests, max_queued_requests=host.max_queued_requests,
        # Colocated, the primary's variant and why show under the ingress in `mlplatform serve status`.
        **({"user_config": choices["primary"]} if ing.colocate else {}),
        backpressure_config={"status_code": 503, "retry_after_s": ing.retry_after_s}, logging_config=logging_config,
        **options, **_HEALTH,
    ).bind(settings, bound.get("primary"), bound.get("fallback"), bound.get("canary"), gate)


def _resolve_auto(spec: ServeSpec, versions: dict[str, Any]) -> tuple[ServeSpec, dict[str, dict[str, Any]]]:
    """`variant: auto` → the measured-fastest gated variant per deployment; and per role what to show
    in status (Serve's user_config: variant, why, ONNX Runtime options).

    Raises:
        ModelNotDeployable: auto on a version with no exported, gate-passed ONNX variant.
    """
    from mlplatform.export import tuned_options
    from mlplatform.serve import _variant

    chosen: dict[str, ModelDeploymentSpec] = {}
    shown: dict[str, dict[str, Any]] = {}
    for role, dep in spec.deployments().items():
        if dep.variant == Variant.AUTO:
            choice = _variant.choose(
                (versions[role].lineage.extra or {}).get("export"), _variant.node_group(dep.label_selector),
                dep.batching.max_batch_size, versions[role].ref, role, local_cpu=_local_cpu(),
                files={f.path for f in versions[role].files},
            )
            logger.info("%s %s: variant auto → %s", spec.name, role, choice.reason)
            dep = dep.model_copy(update={"variant": Variant(choice.variant)})
            chosen[role] = dep
            reason = choice.reason
        else:
            reason = f"{dep.variant.value}: set in the ServeSpec"
        shown[role] = {"variant": dep.variant.value, "variant_reason": reason}
        if dep.variant != Variant.TORCH:
            shown[role]["ort_options"] = tuned_options(dep.num_cpus)
    if not chosen:
        return spec, shown
    update: dict[str, Any] = {}
    if "primary" in chosen:
        update["primary"] = chosen["primary"]
    if "fallback" in chosen:
        update["fallback"] = spec.fallback.model_copy(update={"deployment": chosen["fallback"]})
    if "canary" in chosen:
        update["canary"] = spec.canary.model_copy(update={"deployment": chosen["canary"]})
    return spec.model_copy(update=update), shown


def _local_cpu() -> dict[str, Any]:
    """This machine's CPU flags: the nearest measurement when the deployment's group has none."""
    import dataclasses

    from mlplatform.export import cpu_features

    return dataclasses.asdict(cpu_features())


def _selectors(spec: ServeSpec, policy) -> dict[str, dict[str, str]]:
    """Each deployment's label selector (and the canary gate's), narrowed by the residency policy."""
    own = {role: dict(d.label_selector) for role, d in spec.deployments().items()}
    own["ingress"] = dict(spec.ingress.label_selector)
    own["gate"] = {}
    if policy is None:
        if spec.classification:
            raise ResidencyError(
                f"Got {spec.classification!r} for `classification`, but this cluster has no residency policy, so "
                "nothing would keep the replicas where that data must stay. Deploy on a cluster whose spec names a "
                "`residency_policy`, or remove `classification`."
            )
        return own
    return {role: policy.place(spec.classification, selector, f"{role}.label_selector" if role != "gate" else "classification")
            for role, selector in own.items()}


def _check_proxies(spec: ServeSpec, policy) -> None:
    """Refuse an app whose requests would pass through a Serve HTTP proxy outside its regions.

    Requests carry the app's data, and Serve runs proxies where `proxy_location` says (cluster
    wide, fixed when Serve starts): HeadOnly keeps one proxy on the head node.
    """
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    from mlplatform.cluster.inventory import from_ray_nodes

    labels = {n.node_id: dict(n.labels) for n in from_ray_nodes(ray.nodes())}
    proxies = {node: labels.get(node, {}) for node in serve.status().proxies}
    name = policy.resolve(spec.classification)
    bad = guard.outside(policy.to_json(), name, proxies)
    if bad:
        regions = sorted({proxies[n].get(residency.REGION_LABEL) or "(none)" for n in bad})
        raise ResidencyError(
            f"Serve runs HTTP proxies in region(s) {', '.join(regions)}, which would carry the requests of app "
            f"{spec.name!r} ({name!r} data, allowed only in {policy.where(name)}). Start Serve with "
            "`proxy_location: HeadOnly` on a cluster whose head is inside those regions (restart Serve: "
            "`serve shutdown`, then deploy again)."
        )


def _alias(ref: str) -> str | None:
    """The alias a reference names ('digits@canary' -> 'canary'); None for a number or 'latest'."""
    selector = ref.split("@", 1)[1]
    return None if selector.isdigit() or selector == "latest" else selector


def _replica_options(selector, num_cpus, num_gpus, replicas, autoscaling, runtime_env=None) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        actor["num_gpus"] = num_gpus
    if selector:
        actor["label_selector"] = dict(selector)
    if runtime_env:
        actor["runtime_env"] = runtime_env
    out: dict[str, Any] = {"ray_actor_options": actor}
    if replicas is not None:
        out["num_replicas"] = replicas
    else:
        out["autoscaling_config"] = autoscaling.resolved()
    return out


def _check_export_gate(version, variant: Variant, role: str) -> None:
    """Refuse a variant the export gate failed, from the lineage the export recorded (if any)."""
    if variant == Variant.TORCH:
        return
    export = (version.lineage.extra or {}).get("export") or {}
    deployable = export.get("deployable")
    if isinstance(deployable, dict) and variant.value in deployable and not deployable[variant.value]:
        raise ModelNotDeployable(
            f"Got {variant.value!r} for `{role}.variant`; {version.ref}'s export gate marked it NOT deployable. "
            f"Deployable variants: {sorted(k for k, v in deployable.items() if v) or 'none'}."
        )


def _preflight(spec: ServeSpec, selectors: dict[str, dict[str, str]]) -> None:
    """Fail fast when no live node can hold a deployment (Ray would leave it pending silently)."""
    import ray

    if not ray.is_initialized():
        return  # building without a cluster (unit tests, config checks)
    from mlplatform.cluster.inventory import from_ray_nodes

    nodes = [n for n in from_ray_nodes(ray.nodes()) if n.alive]
    wanted = [(role, selectors[role], d.num_cpus, d.num_gpus) for role, d in spec.deployments().items()]
    if not spec.ingress.colocate:
        wanted.append(("ingress", selectors["ingress"], spec.ingress.num_cpus, 0))
    has_fallback = bool(spec.fallback and spec.fallback.enabled)
    for role, selector, cpus, gpus in wanted:
        # One replica must fit on one node; autoscaling adds the rest as room appears.
        if placement.capacity(nodes, selector, {"CPU": cpus, "GPU": gpus}).largest >= 1:
            continue
        groups = sorted({f"{n.group} ({n.resources.get('CPU', 0):g} CPU, {n.resources.get('GPU', 0):g} GPU)" for n in nodes})
        confined = "" if not spec.classification else (
            f" (`classification` {spec.classification!r} confines it to the regions the residency policy allows)")
        message = (
            f"No live node satisfies `{role}.label_selector` {dict(selector)}{confined} with {cpus:g} CPU and {gpus:g} "
            f"GPU; live node groups: {', '.join(groups)}. Fix the selector or the resources, or add nodes to that group."
        )
        if role == "primary" and has_fallback:
            # Spot GPUs may all be gone right now; the fallback serves until they return.
            logger.warning("%s The fallback deployment serves meanwhile.", message)
            continue
        raise PlacementError(message)
