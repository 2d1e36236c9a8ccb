"""KubeRay manifests (RayCluster, RayJob, RayService) are rendered from the cluster specs, are
valid against the official CRDs, and the shipped ones equal their render."""

import functools

import jsonschema
import pytest
import yaml

from conftest import REPO
from mlplatform import config, residency
from mlplatform.cli import main
from mlplatform.cluster import ClusterSpec
from mlplatform.cluster.kuberay import TLS_ENV, render_raycluster, render_rayjob, render_rayservice
from mlplatform.cluster.render import RenderOptions, render, rendered_by
from mlplatform.errors import PlatformError

CRDS = REPO.parent / "shared" / "kuberay-crds"
SPECS = sorted((REPO / "cluster_configs" / "local").glob("*.yaml"))
SHIPPED = sorted((REPO / "cluster_configs" / "kuberay").glob("*.yaml"))
CLOUD = "cluster_configs/cloud/uae.yaml"
TRAIN = "python jobs/train.py --config jobs/configs/digits.yaml"


def crd_schema(kind):
    if not (CRDS / f"ray.io_{kind.lower()}s.yaml").exists():
        pytest.skip(f"Requires: the KubeRay CRDs at {CRDS}")
    return _schema(kind)


@functools.cache
def _schema(kind):
    # Each CRD is ~1 MB of YAML: parse it once, with libyaml.
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=yaml.CSafeLoader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    # No metaschema check of the CRD itself (slow on a schema this size): it is upstream's.
    return jsonschema.Draft7Validator(schema)


def _rerender(path, capsys, monkeypatch):
    """Run the command a shipped file's header names; return its output."""
    monkeypatch.chdir(REPO)
    assert main(rendered_by(path)) == 0
    return capsys.readouterr().out


def test_every_local_spec_has_its_shipped_raycluster():
    assert {p.name for p in SPECS} <= {p.name for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_manifest_is_the_render_its_header_names(path, capsys, monkeypatch):
    assert path.read_text() == _rerender(path, capsys, monkeypatch), (
        f"{path.name} drifted from its spec: re-render it with the command in its first line"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_manifest_validates_against_its_crd(path):
    manifest = yaml.safe_load(path.read_text())
    assert [e.message for e in crd_schema(manifest["kind"]).iter_errors(manifest)] == []


def test_shipped_files_hold_every_kind():
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in SHIPPED}
    assert kinds == {"RayCluster", "RayJob", "RayService"}


def test_drift_is_caught(tmp_path, monkeypatch):
    # A spec edit without a re-render: the render differs from the shipped file.
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "cluster_configs/local/dev.yaml").read_text())
    spec["head"]["cpus"] = 3
    edited = tmp_path / "dev.yaml"
    edited.write_text(yaml.safe_dump(spec))
    shipped_body = (REPO / "cluster_configs/kuberay/dev.yaml").read_text().split("\n", 1)[1]
    assert render("raycluster", str(edited)).split("\n", 1)[1] != shipped_body


def test_groups_keep_their_place_labels_and_auth():
    path = REPO / "cluster_configs/local/three-region.yaml"
    spec = config.load(path, ClusterSpec)
    policy = residency.for_cluster_spec(spec, path)
    manifest = render_raycluster(spec, policy=policy)["spec"]
    assert manifest["authOptions"] == {"mode": "token", "secretName": "three-region-ray-token"}
    eu = next(g for g in manifest["workerGroupSpecs"] if g["groupName"] == "eu")
    pod = eu["template"]["spec"]
    assert pod["nodeSelector"]["topology.kubernetes.io/region"] == "eu-central-1"
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in pod["containers"][0]["env"]}
    assert env == {"RAY_NODE_REGION": "eu-central-1", "RAY_NODE_ZONE": "eu-central-1a", "RAY_NODE_TYPE_NAME": "eu", "RAY_NODE_MARKET_TYPE": "on-demand",
                   # the shared metadata store, from a Secret (no password in the manifest)
                   "MLPLATFORM_METADATA_URL": {"secretKeyRef": {"name": "mlplatform-metadata", "key": "url", "optional": True}},
                   # every Ray process on the pod works for this cluster, under its residency policy
                   "MLPLATFORM_CLUSTER": "three-region", "MLPLATFORM_RESIDENCY_POLICY": residency.encode(policy),
                   # and every worker process there starts under the residency guard
                   **residency.guard.node_env(),
                   # Serve's cluster-wide switches (cluster spec `serve`), stated on every node as local nodes get them
                   **spec.serve.node_env(),
                   # Ray's internal mutual TLS with the pod's own certificate (test_tls_... below)
                   **TLS_ENV}
    # Prometheus scrapes every pod's `metrics` port, which Ray exports on.
    assert pod["containers"][0]["ports"] == [{"containerPort": 8080, "name": "metrics"}]
    assert eu["rayStartParams"]["metrics-export-port"] == "8080"
    head_ports = {p["name"]: p["containerPort"] for p in manifest["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert head_ports["dashboard"] == 8265 and head_ports["metrics"] == 8080
    gpu = next(g for g in manifest["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["labels"] == {"mlplatform.io/simulated-gpu": "true"}
    assert "enableInTreeAutoscaling" not in manifest  # fixed groups: exactly `count`
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (1, 1, 1)


def test_autoscaled_groups_get_bounds_and_the_autoscaler():
    spec = config.load(REPO / CLOUD, ClusterSpec)
    manifest = render_raycluster(spec, token_secret="my-token")["spec"]
    assert manifest["authOptions"]["secretName"] == "my-token"
    assert manifest["enableInTreeAutoscaling"] is True
    assert manifest["autoscalerOptions"] == {"version": "v2", "idleTimeoutSeconds": 300, "upscalingMode": "Conservative"}
    groups = {g["groupName"]: g for g in manifest["workerGroupSpecs"]}
    assert (groups["cpu"]["replicas"], groups["cpu"]["minReplicas"], groups["cpu"]["maxReplicas"]) == (1, 1, 4)
    assert (groups["gpu-a10g"]["replicas"], groups["gpu-a10g"]["maxReplicas"]) == (0, 4)
    limits = groups["gpu-a10g"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


def _submit_command(job):
    return job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["command"][-1]


def test_restricted_job_pins_its_driver_to_its_regions(monkeypatch):
    monkeypatch.chdir(REPO)
    # The classification comes from the entrypoint's spec (digits.yaml: uae-restricted).
    job = yaml.safe_load(render("rayjob", "cluster_configs/local/three-region.yaml", RenderOptions(entrypoint=TRAIN)))
    assert job["spec"]["entrypoint"] == TRAIN
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    command = _submit_command(job)
    assert """--entrypoint-label-selector '{"ray.io/availability-region": "me-central-1"}' -- """ + TRAIN in command
    # The job's cluster is the RayCluster render of the same spec.
    spec = config.load(REPO / "cluster_configs/local/three-region.yaml", ClusterSpec)
    policy = residency.for_cluster_spec(spec, REPO / "cluster_configs/local/three-region.yaml")
    assert job["spec"]["rayClusterSpec"] == render_raycluster(spec, policy=policy)["spec"]
    # Internal data may also use the EU: the selector says so.
    internal = yaml.safe_load(render("rayjob", "cluster_configs/local/three-region.yaml",
                                     RenderOptions(entrypoint="python jobs/hello.py", classification="internal")))
    assert "in(eu-central-1,me-central-1)" in _submit_command(internal)


def test_job_without_a_policy_is_not_pinned():
    spec = config.load(REPO / "cluster_configs/local/dev.yaml", ClusterSpec)
    job = render_rayjob(spec, "python jobs/hello.py")
    assert "submitterPodTemplate" not in job["spec"] and job["metadata"]["name"] == "dev-hello"


def test_service_embeds_the_serve_config(monkeypatch):
    monkeypatch.chdir(REPO)
    service = yaml.safe_load(render("rayservice", CLOUD, RenderOptions(serve_config="serve_apps/digits-cpu.yaml")))
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    original = yaml.safe_load((REPO / "serve_apps/digits-cpu.yaml").read_text())
    assert serve["applications"] == original["applications"]
    assert serve["http_options"]["host"] == "0.0.0.0"  # reachable through the pod's address
    assert service["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("target,options,message", [
    ("rayjob", RenderOptions(), r"Got no `--entrypoint`; --target rayjob needs it, e\.g\."),
    ("rayservice", RenderOptions(), r"Got no `--serve-config`; --target rayservice needs it"),
    ("raycluster", RenderOptions(serve_config="serve_apps/digits-cpu.yaml"), r"`--serve-config` with --target raycluster"),
    ("rayjob", RenderOptions(entrypoint=TRAIN, classification="secret"), r"Got 'secret' for `--classification`"),
    ("helmchart", RenderOptions(), r"Got 'helmchart' for `--target`; must be one of raycluster, rayjob, rayservice, launcher"),
])
def test_bad_render_requests_name_the_flag(target, options, message, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(PlatformError, match=message):
        render(target, "cluster_configs/local/three-region.yaml", options)


def test_cli_prints_render_errors(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["cluster", "render", "--target", "rayservice", "--config", CLOUD]) != 0
    assert "Got no `--serve-config`" in capsys.readouterr().err


def test_invalid_manifest_is_caught_by_the_schema():
    manifest = render_raycluster(config.load(SPECS[0], ClusterSpec))
    manifest["spec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError, match="'password' is not one of"):
        crd_schema("RayCluster").validate(manifest)


def test_tls_follows_rays_kuberay_pattern_and_keeps_the_ca_key_from_ray():
    spec = config.load(REPO / "cluster_configs/local/three-region.yaml", ClusterSpec)
    manifest = render_raycluster(spec)["spec"]
    for group in [manifest["headGroupSpec"], *manifest["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        # The CA from the cluster's Secret; the Ray container's volume holds ca.crt only.
        assert volumes["ray-tls-ca-signing"]["secret"]["secretName"] == "three-region-ray-tls"
        assert volumes["ray-tls-ca"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
        (init,) = pod["initContainers"]
        assert {m["name"] for m in init["volumeMounts"]} == {"ray-tls-ca-signing", "ray-tls"}
        assert "$POD_IP" in init["command"][-1] and "ca.key" in init["command"][-1]
        ray = pod["containers"][0]
        assert "ray-tls-ca-signing" not in {m["name"] for m in ray["volumeMounts"]}
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert {k: env[k] for k in TLS_ENV} == TLS_ENV


def test_tls_false_renders_no_tls_and_rayservice_serves_https():
    spec = config.load(REPO / "cluster_configs/local/dev.yaml", ClusterSpec)
    plain = render_raycluster(spec.model_copy(update={"tls": False}))["spec"]["headGroupSpec"]["template"]["spec"]
    assert "initContainers" not in plain and "RAY_USE_TLS" not in {e["name"] for e in plain["containers"][0]["env"]}
    service = yaml.safe_load(render_rayservice(spec, {"applications": []}, "svc")["spec"]["serveConfigV2"])
    assert service["http_options"]["ssl_certfile"] == TLS_ENV["RAY_TLS_SERVER_CERT"]
    assert service["http_options"]["ssl_keyfile"] == TLS_ENV["RAY_TLS_SERVER_KEY"]
