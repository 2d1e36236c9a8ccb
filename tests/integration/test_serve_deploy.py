"""`serve deploy` of a serve_apps-style YAML (the real Ray CLI, in a subprocess) and what it serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from conftest import REPO, free_port
from serve_models import digits_data, https_options, register_digits, run_onnx

pytestmark = pytest.mark.timeout(600)


def _rows(batch: int, **speeds: float) -> list[dict]:
    return [{"runtime": r, "batch_size": batch, "p50_ms": 0.1, "p99_ms": 0.2, "throughput": t, "runs": 100}
            for r, t in speeds.items()]


# What `mlplatform export` records (lineage.extra.export), as measured on two node groups: on the `cpu`
# group (VNNI) INT8 is fastest at batch 32, on `gpu` (AVX2 only) FP32 is. The shipped config says
# `variant: auto` on the cpu group at max_batch_size 32, so it must pick onnx_int8 by these numbers.
_CPU = {"model": "test", "logical_cpus": 4, "avx2": True, "avx512": True, "vnni": True, "amx": False}
EXPORT_RECORD = {"deployable": {"onnx_fp32": True, "onnx_int8": True}, "benchmarks": [
    {"node_group": "gpu", "cpu": {**_CPU, "avx512": False, "vnni": False}, "threads": 2,
     "rows": _rows(32, torch_fp32=2e4, onnx_fp32=4e5, onnx_int8=1e5)},
    {"node_group": "cpu", "cpu": _CPU, "threads": 2,
     "rows": _rows(8, torch_fp32=1e4, onnx_fp32=9e4, onnx_int8=5e4) + _rows(32, torch_fp32=2e4, onnx_fp32=2e5,
                                                                           onnx_int8=4.1e5)},
]}


def _serve_cli(args: list[str], cluster) -> subprocess.CompletedProcess:
    env = {**os.environ, **cluster.env(), "RAY_DASHBOARD_ADDRESS": cluster.dashboard_url}
    serve = Path(sys.executable).with_name("serve")
    return subprocess.run([str(serve), *args], env=env, capture_output=True, text=True, timeout=120)


def _wait_for(app: str, want: set[str], timeout: float = 120) -> str:
    from ray import serve

    deadline, status = time.time() + timeout, None
    while time.time() < deadline:
        apps = serve.status().applications
        if app in apps:
            status = apps[app]
            if str(status.status.value) in want:
                return str(status.status.value) + ": " + status.message
        time.sleep(1)
    raise AssertionError(f"{app} never reached {want}: {status}")


@pytest.fixture(scope="module")
def deployed(three_region_cluster, tmp_path_factory):
    import ray
    from ray import serve

    from mlplatform.cluster import connect

    work = tmp_path_factory.mktemp("serve-deploy")
    register_digits(work / "registry", work / "artifacts", lineage={"extra": {"export": EXPORT_RECORD}})
    # The shipped config with this test's registry, key directory and a free port.
    config = yaml.safe_load((REPO / "serve_apps/digits-cpu.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    # Ray's `serve` CLI takes http_options from the file alone: name the cluster's certificate.
    config["http_options"].update(https_options(three_region_cluster))
    args = config["applications"][0]["args"]
    args.update(registry_root=str(work / "registry"), auth={"keys_dir": str(work / "keys")})
    args["primary"]["autoscaling"] = {"preset": "latency", "max_replicas": 1}
    path = work / "digits-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    connect(three_region_cluster.name)
    serve.shutdown()
    try:
        result = _serve_cli(["deploy", str(path)], three_region_cluster)
        assert result.returncode == 0, result.stderr[-2000:]
        _wait_for("digits-cpu", {"RUNNING"})
        yield f"https://127.0.0.1:{port}", work, config
    finally:
        serve.shutdown()
        ray.shutdown()


def test_serve_deploy_serves_the_shipped_config_with_keys(deployed):
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from mlplatform.serve import check_config, create_key

    base, work, config = deployed
    check_config(work / "digits-cpu.yaml")  # the edited copy still validates as a serve_apps file
    x, _ = digits_data()
    body = {"inputs": x[:2].tolist()}
    assert requests.post(base + "/v1/predict", json=body, timeout=30).status_code == 401
    key = create_key("digits-cpu", keys_dir=work / "keys").key
    r = requests.post(base + "/v1/predict", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Served-By"] == "primary/onnx_int8" and len(r.json()["outputs"]) == 2
    int8 = next((work / "artifacts").glob("digits-*")) / "model.int8.onnx"
    np.testing.assert_allclose(r.json()["outputs"], run_onnx(int8, x[:2]), rtol=1e-5, atol=1e-5)
    # Colocated, as shipped: one deployment (the ingress, holding the model) on the cpu group.
    assert set(serve.status().applications["digits-cpu"].deployments) == {"ingress"}
    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes()}
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                if a.class_name.startswith("ServeReplica:digits-cpu:")]
    assert replicas and {labels[a.node_id]["ray.io/node-group"] for a in replicas} == {"cpu"}
    # uae-restricted (as shipped): the replicas and the HTTP proxy carrying its requests stay in the UAE.
    proxies = [a for a in list_actors(filters=[("state", "=", "ALIVE"), ("class_name", "=", "ProxyActor")], detail=True)]
    assert proxies and {labels[a.node_id]["ray.io/availability-region"] for a in replicas + proxies} == {"me-central-1"}


def test_serve_status_shows_the_variant_auto_chose_and_why(deployed, three_region_cluster):
    """`mlplatform serve status` (the console script) names the variant and the measured numbers it won by."""
    env = {**os.environ, **three_region_cluster.env(), "RAY_DASHBOARD_ADDRESS": three_region_cluster.dashboard_url}
    cli = Path(sys.executable).with_name("mlplatform")
    out = subprocess.run([str(cli), "serve", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ingress = json.loads(out.stdout)["digits-cpu"]["deployments"]["ingress"]  # colocated: the model is in it
    assert ingress["variant"] == "onnx_int8"
    assert ingress["variant_reason"].startswith("onnx_int8: 410k rows/s at batch 32 on node group cpu "
                                                "(AVX2, AVX-512, VNNI), vs onnx_fp32 200k"), ingress
    assert ingress["ort_options"]["intra_op_num_threads"] == 1  # num_cpus 1 as shipped


def test_serve_deploy_with_bad_args_fails_with_the_spec_error(deployed, three_region_cluster):
    base, work, config = deployed
    bad = yaml.safe_load(yaml.safe_dump(config))
    app = bad["applications"][0]
    app["name"] = app["args"]["name"] = "digits-bad"
    app["route_prefix"] = "/bad"
    app["args"]["primary"]["batching"]["max_batch_size"] = 0
    app["args"]["primary"]["colour"] = "blue"
    bad["applications"].insert(0, config["applications"][0])  # a config file replaces every app
    path = work / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert _serve_cli(["deploy", str(path)], three_region_cluster).returncode == 0
    message = _wait_for("digits-bad", {"DEPLOY_FAILED"})
    assert "primary.batching.max_batch_size" in message and "primary.colour" in message, message
    # The healthy application next to it keeps serving.
    assert requests.get(base + "/healthz", timeout=10).status_code == 200


def test_cost_report_meters_the_deployment_from_its_replicas(deployed, three_region_cluster):
    """`mlplatform cost report --refresh --by deployment`: the app's replicas, metered from Ray's
    records and priced by the cluster's catalog (the `cpu` group, on demand)."""
    env = {**os.environ, **three_region_cluster.env(), "MLPLATFORM_CLUSTER": three_region_cluster.name}
    out = subprocess.run([sys.executable, "-m", "mlplatform", "cost", "report", "--refresh", "--by", "deployment",
                          "--json", "--cluster", three_region_cluster.name],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rows = {r["key"]: r for r in json.loads(out.stdout)["rows"]}
    ingress = rows["digits-cpu/ingress"]
    assert ingress["cost"] > 0 and ingress["markets"] == ["on-demand"] and ingress["regions"] == ["me-central-1"]
