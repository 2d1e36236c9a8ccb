"""Render a cluster spec as KubeRay manifests: RayCluster, RayJob and RayService, on Kubernetes.

The spec stays the one source of truth: the manifests under cluster_configs/kuberay/ are
these functions' output (a test checks they agree, and validates them against the
official CRDs). Each group's region and zone become a nodeSelector on Kubernetes'
topology labels, so pods, and the data they touch, stay where the spec puts them; the
RAY_NODE_* variables give Ray the same standard labels the local cluster has. A RayJob
and a RayService embed the very same RayCluster spec.

TLS (spec `tls`, on by default) follows Ray's KubeRay TLS guide: the cluster's CA sits in a
Secret (`<name>-ray-tls`, keys ca.crt and ca.key: the CA `cluster up` made, see tls_secret_command),
and an init container in every pod signs a certificate for that pod's own IP with it; the Ray
container sees only that certificate, its key and ca.crt, never the CA's key.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

from mlplatform import residency
from mlplatform.cluster import tls
from mlplatform.cluster.autoscaler import bounds
from mlplatform.cluster.local import _LABEL_ENV
from mlplatform.cluster.spec import ClusterSpec, NodeGroup
from mlplatform.errors import SpecError
from mlplatform.residency import guard

if TYPE_CHECKING:
    from mlplatform.residency import ResidencyPolicy

RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311"
# The shared metadata store (PostgreSQL) for every pod, from a Secret so the password is in no
# manifest: kubectl create secret generic mlplatform-metadata --from-literal=url=postgresql://...
METADATA_SECRET = "mlplatform-metadata"
_METADATA_URL = {
    "name": "MLPLATFORM_METADATA_URL",
    "valueFrom": {"secretKeyRef": {"name": METADATA_SECRET, "key": "url", "optional": True}},
}
# KubeRay's conventional ports (its head Service and Prometheus' PodMonitors find them by
# these names). Pods have their own addresses, so the spec's `ports:` (which keep several
# local clusters apart on one machine) do not apply here.
METRICS_PORT = 8080
_HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": METRICS_PORT}
# KubeRay's upscaling modes: Conservative is Ray's upscaling_speed 1, Default is unlimited.
_CONSERVATIVE_SPEED = 1.0


def token_secret_name(spec: ClusterSpec) -> str:
    """The default Secret holding the cluster's auth token (data key `auth_token`)."""
    return f"{spec.name}-ray-token"


def tls_secret_name(spec: ClusterSpec) -> str:
    """The Secret holding the cluster's CA (data keys `ca.crt`, `ca.key`)."""
    return f"{spec.name}-ray-tls"


def tls_secret_command(spec: ClusterSpec, tls_dir: str) -> str:
    """The kubectl line that puts the CA `cluster up` made (in `tls_dir`) into the cluster's TLS Secret."""
    return (f"kubectl create secret generic {tls_secret_name(spec)} --from-file=ca.crt={tls_dir}/ca.crt "
            f"--from-file=ca.key={tls_dir}/ca.key")


# Where pods keep TLS files: the CA certificate (from the Secret) and the pod's own pair (emptyDir).
_CA_DIR, _POD_TLS_DIR = "/etc/ray/ca", "/etc/ray/tls"
# The init container's job: a key and a certificate for this pod's IP, signed by the cluster's CA.
_GENCERT = tls.sign_script("/etc/ray/ca-signing", _POD_TLS_DIR)
TLS_ENV = {
    "RAY_USE_TLS": "1",
    "RAY_TLS_SERVER_CERT": f"{_POD_TLS_DIR}/tls.crt",
    "RAY_TLS_SERVER_KEY": f"{_POD_TLS_DIR}/tls.key",
    "RAY_TLS_CA_CERT": f"{_CA_DIR}/ca.crt",
}


def render_raycluster(
    spec: ClusterSpec, image: str = DEFAULT_IMAGE, policy: ResidencyPolicy | None = None,
    token_secret: str | None = None,
) -> dict[str, Any]:
    """A `ray.io/v1` RayCluster with token auth, one worker group per spec group.

    With `policy` (the spec's residency policy), every pod carries it in its environment, as
    `cluster up` gives it to local nodes: every Ray worker process of every job inherits it.
    The token comes from the Secret `token_secret` (default `<name>-ray-token`), which
    KubeRay hands to every Ray container; users read it from there to connect.
    """
    env = [{"name": residency.CLUSTER_ENV, "value": spec.name}, _METADATA_URL]
    env += [{"name": name, "value": value} for name, value in spec.serve.node_env().items()]
    if policy is not None:
        env.append({"name": residency.POLICY_ENV, "value": residency.encode(policy)})
        env += [{"name": name, "value": value} for name, value in guard.node_env().items()]
    body: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": token_secret or token_secret_name(spec)},
    }
    if spec.autoscaled():
        body["enableInTreeAutoscaling"] = True
        body["autoscalerOptions"] = {
            # v2: the autoscaler that launches nodes for label selectors.
            "version": "v2",
            "idleTimeoutSeconds": int(spec.autoscaler.idle_timeout_s),
            "upscalingMode": "Conservative" if spec.autoscaler.upscaling_speed <= _CONSERVATIVE_SPEED else "Default",
        }
    body["headGroupSpec"] = {
        "rayStartParams": {**_start_params(spec.head), "dashboard-host": "0.0.0.0"},
        **_group_fields(spec.head),
        "template": _pod(spec.head, image, "ray-head", env, _HEAD_PORTS),
    }
    body["workerGroupSpecs"] = [_worker_group(group, image, env) for group in spec.worker_groups]
    if spec.tls:
        for group in [body["headGroupSpec"], *body["workerGroupSpecs"]]:
            _add_tls(group["template"], image, tls_secret_name(spec))
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": spec.name, "labels": _MANAGED},
        "spec": body,
    }


def render_rayjob(
    spec: ClusterSpec, entrypoint: str, image: str = DEFAULT_IMAGE, policy: ResidencyPolicy | None = None,
    classification: str | None = None, token_secret: str | None = None, name: str | None = None,
) -> dict[str, Any]:
    """A RayJob that runs `entrypoint` (what `ray job submit` runs after `--`) on its own cluster.

    Under a residency policy the driver is pinned to the regions of the job's `classification`
    (None: the policy's default) with `ray job submit --entrypoint-label-selector`. The RayJob
    CRD has no field for it (only entrypointNumCpus/Gpus/Resources, by resource), so the job
    gets its own submitter pod whose command is KubeRay's submission plus that flag.

    Raises:
        SpecError: `classification` is unknown, or no node group lies where it may run.
    """
    secret = token_secret or token_secret_name(spec)
    job: dict[str, Any] = {
        "entrypoint": entrypoint,
        # The cluster exists for this job: gone once it ends (10 min later, to read its logs).
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "rayClusterSpec": render_raycluster(spec, image, policy, secret)["spec"],
    }
    selector = _driver_selector(spec, policy, classification)
    if selector:
        job["submitterPodTemplate"] = _submitter(entrypoint, selector, image, secret)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name or job_name(spec, entrypoint), "labels": _MANAGED},
        "spec": job,
    }


def render_rayservice(
    spec: ClusterSpec, serve_config: dict[str, Any], name: str, image: str = DEFAULT_IMAGE,
    policy: ResidencyPolicy | None = None, token_secret: str | None = None,
) -> dict[str, Any]:
    """A RayService running a (validated) Serve config file on a cluster rendered from `spec`.

    Serve listens on every address of the head pod (`http_options.host: 0.0.0.0`): KubeRay's
    serve Service reaches it through the pod's address, never 127.0.0.1.
    """
    config = dict(serve_config)
    config["http_options"] = {**config.get("http_options", {}), "host": "0.0.0.0"}
    if spec.tls:
        # HTTPS with the head pod's own certificate (the proxy runs there: HeadOnly).
        config["http_options"].update(ssl_certfile=TLS_ENV["RAY_TLS_SERVER_CERT"], ssl_keyfile=TLS_ENV["RAY_TLS_SERVER_KEY"])
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": _MANAGED},
        "spec": {
            "serveConfigV2": _yaml(config),
            "rayClusterConfig": render_raycluster(spec, image, policy, token_secret)["spec"],
        },
    }


def _add_tls(template: dict[str, Any], image: str, secret: str) -> None:
    """Ray's internal mutual TLS for one pod template: an init container signs the pod's certificate."""
    pod = template["spec"]
    pod["volumes"] = [
        # The CA key only for the init container; the Ray container mounts ca.crt alone.
        {"name": "ray-tls-ca-signing", "secret": {"secretName": secret, "defaultMode": 0o400}},
        {"name": "ray-tls-ca", "secret": {"secretName": secret, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"name": "ray-tls", "emptyDir": {"medium": "Memory"}},
    ]
    pod["initContainers"] = [{
        "name": "ray-tls",
        "image": image,
        "command": ["/bin/sh", "-c", _GENCERT],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "volumeMounts": [{"name": "ray-tls-ca-signing", "mountPath": "/etc/ray/ca-signing", "readOnly": True},
                         {"name": "ray-tls", "mountPath": _POD_TLS_DIR}],
    }]
    container = pod["containers"][0]
    container["env"] = container["env"] + [{"name": k, "value": v} for k, v in TLS_ENV.items()]
    container["volumeMounts"] = [{"name": "ray-tls-ca", "mountPath": _CA_DIR, "readOnly": True},
                                 {"name": "ray-tls", "mountPath": _POD_TLS_DIR, "readOnly": True}]


def job_name(spec: ClusterSpec, entrypoint: str) -> str:
    """A RayJob name from the cluster and the entrypoint's script (`python jobs/train.py` → train)."""
    scripts = [w for w in shlex.split(entrypoint) if w.endswith(".py")]
    stem = scripts[0].rsplit("/", 1)[-1][:-3].replace("_", "-").lower() if scripts else "job"
    return f"{spec.name}-{stem}"


_MANAGED = {"app.kubernetes.io/managed-by": "mlplatform"}


def _driver_selector(spec: ClusterSpec, policy: ResidencyPolicy | None, classification: str | None) -> dict[str, str]:
    if policy is None:
        return {}
    selector = policy.selector(policy.resolve(classification, "--classification"))
    if not any(selector.matches(g.node_labels()) for g in spec.groups()):
        raise SpecError(
            f"Got {classification or policy.default_classification!r} for `--classification`; its work may only "
            f"run in {policy.where(classification)}, where no node group of cluster {spec.name!r} lies. Add a group "
            "there or render the job for another cluster spec."
        )
    return selector.to_ray()


def _submitter(entrypoint: str, selector: dict[str, str], image: str, secret: str) -> dict[str, Any]:
    # KubeRay's own submission (submit unless a retry finds it submitted, then follow the logs),
    # plus the selector; KubeRay sets both variables in the submitter container.
    address = "--address http://$RAY_DASHBOARD_ADDRESS"
    submit = (
        f"ray job submit {address} --submission-id $RAY_JOB_SUBMISSION_ID --no-wait "
        f"--entrypoint-label-selector {shlex.quote(json.dumps(selector))} -- {entrypoint}"
    )
    script = (
        f"if ! ray job status {address} $RAY_JOB_SUBMISSION_ID >/dev/null 2>&1; then {submit}; fi; "
        f"ray job logs {address} --follow $RAY_JOB_SUBMISSION_ID"
    )
    return {
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "command": ["bash", "-c", script],
                    "env": _auth_env(secret),
                }
            ],
        }
    }


def _auth_env(secret: str) -> list[dict[str, Any]]:
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}},
    ]


def _worker_group(group: NodeGroup, image: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    low, high = bounds(group)
    return {
        "groupName": group.name,
        # Autoscaled groups start at their minimum; the autoscaler moves them within the bounds.
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": _start_params(group),
        **_group_fields(group),
        "template": _pod(group, image, "ray-worker", env, {"metrics": METRICS_PORT}),
    }


def _start_params(group: NodeGroup) -> dict[str, str]:
    return {"num-cpus": str(group.cpus), "num-gpus": str(group.gpus), "metrics-export-port": str(METRICS_PORT)}


def _group_fields(group: NodeGroup) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    custom_labels = {k: v for k, v in group.node_labels().items() if k not in _LABEL_ENV}
    if custom_labels:
        fields["labels"] = custom_labels
    if group.resources:
        fields["resources"] = {k: str(v) for k, v in group.resources.items()}
    return fields


def _pod(group: NodeGroup, image: str, container: str, env: list[dict[str, Any]], ports: dict[str, int]) -> dict[str, Any]:
    limits = {"cpu": str(group.cpus), "memory": f"{_mib(group.memory_gb + group.object_store_gb)}Mi"}
    if group.gpus:
        limits["nvidia.com/gpu"] = str(group.gpus)
    labels = group.node_labels()
    return {
        "spec": {
            "nodeSelector": {
                "topology.kubernetes.io/region": group.region,
                "topology.kubernetes.io/zone": group.zone,
            },
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "env": [{"name": var, "value": labels[label]} for label, var in _LABEL_ENV.items()] + env,
                    "ports": [{"containerPort": port, "name": name} for name, port in ports.items()],
                    "resources": {"limits": limits, "requests": dict(limits)},
                }
            ],
        }
    }


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _mib(gib: float) -> int:
    return int(round(gib * 1024))
