"""Serve what export made: train → register → export → serve, on the live three-region cluster.

The model is the session's `trained_digits` artifact (mlplatform.train on the cluster), exported by
mlplatform.export with the shipped export config, so the served files and export_report.json are
the real ones. Each variant is deployed with the platform's builder, one application at a time,
and what it answers is checked against torch's load_model on the trained artifact.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from conftest import REPO
from serve_models import run_onnx, serve_on_free_port

pytestmark = pytest.mark.timeout(600)

ROWS = 32  # one request of the validation split: the builder's default limits.max_rows


@pytest.fixture(scope="module")
def exported(trained_digits, tmp_path_factory):
    """The trained artifact registered and exported (every candidate, gated, benchmarked) in a registry
    of its own: (registry root, exported version, its export report, the fetched version's directory).
    Benchmarked in this process: see below."""
    from mlplatform import registry
    from mlplatform.export import ExportReport, export_model, make_spec

    work = tmp_path_factory.mktemp("serve-exported")
    root = str(work / "registry")
    trained = registry.register(trained_digits, "digits", root=root)
    spec = make_spec(REPO / "jobs/configs/export-digits.yaml")
    # In this process, unconnected (no residency confinement of this test's tmp registry):
    # test_benchmark_runs_on_the_named_node_group covers the per-group Ray task.
    spec = spec.model_copy(update={"benchmark": spec.benchmark.model_copy(update={"node_groups": []})})
    export_model(trained.ref, spec, root=root)
    version = registry.resolve("digits@latest", root=root)
    fetched = work / "fetched"
    registry.fetch(version.ref, fetched, root=root)
    report = ExportReport.from_json(json.loads((fetched / "export_report.json").read_text()))
    return root, version, report, fetched


@pytest.fixture(scope="module")
def validation(trained_digits):
    """The first ROWS held-out rows and torch's outputs for them (load_model on the trained artifact)."""
    import torch

    from mlplatform.train import load_model, read_metadata

    meta = read_metadata(trained_digits)
    table = pq.read_table(meta["dataset"]["validation"])
    x = np.stack([table[c].to_numpy() for c in meta["input_signature"]["feature_columns"]], axis=1)[:ROWS]
    x = x.astype(np.float32)
    with torch.no_grad():
        return x, load_model(trained_digits)(torch.from_numpy(x)).numpy()


def _serve(cluster, spec: dict, pinned: dict[str, dict[str, str]], x: np.ndarray) -> requests.Response:
    """Deploy `spec` with build_app, POST `x` once over HTTP and return the response, after checking
    that each deployment's replicas run on nodes carrying the labels `pinned` names for it."""
    import ray
    from ray import serve
    from ray.util.state import list_actors

    from mlplatform.serve import build_app

    port = serve_on_free_port(cluster)
    try:
        serve.run(build_app(spec), name=spec["name"], route_prefix="/")
        response = requests.post(f"https://127.0.0.1:{port}/v1/predict", json={"inputs": x.tolist()}, timeout=60)
        labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes()}
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
                    if a.class_name.startswith(f"ServeReplica:{spec['name']}:")]
        placed = {}
        for a in replicas:
            deployment = a.class_name.rsplit(":", 1)[1]
            placed.setdefault(deployment, []).append({k: labels[a.node_id].get(k) for k in pinned[deployment]})
        assert placed == {d: [selector] for d, selector in pinned.items()}, placed
    finally:
        serve.delete(spec["name"])
        ray.shutdown()
    return response


def _spec(name: str, root: str, version, **deployments) -> dict:
    """A ServeSpec serving the exported version, without auth or drift (other tests cover them)."""
    return {"name": name, "model": version.ref, "registry_root": root, "auth": {"enabled": False},
            "drift": {"enabled": False}, **deployments}


def test_exported_int8_variant_serves_the_trained_model(three_region_cluster, exported, validation):
    root, version, report, fetched = exported
    x, torch_out = validation
    int8 = report.variant("onnx_int8")
    assert report.source_ref == f"digits@{version.version - 1}" and int8.deployable, int8.failures()
    spec = _spec("exported-int8", root, version, ingress={"colocate": True}, primary={
        "variant": "onnx_int8", "label_selector": {"ray.io/node-group": "cpu"}, "replicas": 1})
    # Colocated, as serve_apps/digits-cpu.yaml ships it: one replica (ingress + model) on the cpu group.
    response = _serve(three_region_cluster, spec, {"ingress": {"ray.io/node-group": "cpu"}}, x)
    assert response.status_code == 200, response.text
    assert response.headers["X-Served-By"] == "primary/onnx_int8"
    assert response.headers["X-Model-Version"] == version.ref
    served = np.asarray(response.json()["outputs"], np.float32)
    # Exactly the INT8 file export wrote, run by ONNX Runtime here on the same batch ...
    np.testing.assert_allclose(served, run_onnx(fetched / "model.int8.onnx", x), rtol=1e-5, atol=1e-5)
    # ... and agreeing with the trained torch model as its gate requires. (Not its max_abs_error:
    # dynamic INT8 quantization scales activations per batch, so one request's error differs from
    # the gate's batches; the gate's own figures are the export tests' business.)
    agreement = next(c.limit for c in int8.checks if c.metric == "top1_agreement")
    assert (served.argmax(1) == torch_out.argmax(1)).mean() >= agreement


def test_benchmark_runs_on_the_named_node_group(ray_on_three_region, trained_digits, tmp_path):
    """`benchmark.node_groups` while connected: one Ray task per group, numbers from that node."""
    from mlplatform.export import ExportSpec, export_artifact

    spec = ExportSpec(static_qdq=False, benchmark={"seconds_per_case": 0.05, "warmup_runs": 1, "batch_sizes": [32],
                                                   "node_groups": ["cpu"]})
    report = export_artifact(trained_digits, tmp_path / "out", spec, bench_on={"cpu": {"ray.io/node-group": "cpu"}})
    (bench,) = report.benchmarks
    assert bench.node_group == "cpu" and bench.threads == 2  # the task read its node's label
    assert {(r.runtime, r.batch_size) for r in bench.rows} == {("torch_fp32", 32), ("onnx_fp32", 32), ("onnx_int8", 32)}
    assert report.benchmark == bench.rows and all(r.throughput > 0 for r in bench.rows)


def test_auto_serves_the_fastest_gated_variant_by_the_exports_numbers(three_region_cluster, exported, validation):
    from mlplatform.serve._variant import choose

    root, version, report, fetched = exported
    x, _ = validation
    (bench,) = report.benchmarks
    assert bench.node_group is None  # measured in the export's process (not connected)
    assert {r.runtime for r in bench.rows} == {"torch_fp32", *report.deployable}
    want = choose(version.lineage.extra["export"], "cpu", 32, version.ref, "primary", local_cpu=bench.cpu.__dict__)
    assert "nearest is the export's machine" in want.reason
    spec = _spec("exported-auto", root, version, ingress={"colocate": True}, primary={
        "variant": "auto", "label_selector": {"ray.io/node-group": "cpu"}, "replicas": 1})
    response = _serve(three_region_cluster, spec, {"ingress": {"ray.io/node-group": "cpu"}}, x)
    assert response.status_code == 200, response.text
    assert response.headers["X-Served-By"] == f"primary/{want.variant}", want.reason
    file = {"onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx", "onnx_int8_qdq": "model.int8.qdq.onnx"}
    np.testing.assert_allclose(np.asarray(response.json()["outputs"], np.float32),
                               run_onnx(fetched / file[want.variant], x), rtol=1e-5, atol=1e-5)


def test_torch_variant_serves_the_trained_model_on_cpu(three_region_cluster, exported, validation):
    root, version, _, _ = exported
    x, torch_out = validation
    # As serve_apps/digits-hybrid.yaml places it (torch on the gpu group, ingress in the UAE), in
    # float32 on the CPU so the answer can be compared with torch's own to float precision.
    spec = _spec("exported-torch", root, version,
                 ingress={"replicas": 1, "num_cpus": 0.1, "label_selector": {"ray.io/availability-region": "me-central-1"}},
                 primary={"variant": "torch", "device": "cpu", "dtype": "float32", "num_cpus": 1, "replicas": 1,
                          "label_selector": {"ray.io/node-group": "gpu"}})
    response = _serve(three_region_cluster, spec, {"ingress": {"ray.io/availability-region": "me-central-1"},
                                                   "primary": {"ray.io/node-group": "gpu"}}, x)
    assert response.status_code == 200, response.text
    assert response.headers["X-Served-By"] == "primary/torch"
    assert response.headers["X-Model-Version"] == version.ref
    np.testing.assert_allclose(np.asarray(response.json()["outputs"]), torch_out, rtol=1e-4, atol=1e-4)
