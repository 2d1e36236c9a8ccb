"""Serving metrics reach a real Prometheus server: it scrapes every node's Ray metrics agent,
found through Ray's service discovery file, and answers queries for the request counter (by
code and version), the latency histogram and the batch-size histogram. Ray exports every ray.util.metrics metric
with a `ray_` prefix: mlplatform_serve_requests_total is scraped as ray_mlplatform_serve_requests_total.

Needs the `prometheus` binary (`make test` installs Debian's package); see tests/prometheus.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from prometheus import query as _query
from prometheus import server
from prometheus import until as _until
from serve_models import digits_data, register_digits, serve_on_free_port

pytestmark = pytest.mark.timeout(300)

@pytest.fixture
def prometheus(three_region_cluster, tmp_path):
    with server(three_region_cluster, tmp_path) as url:
        yield url


def test_serving_metrics_reach_prometheus(prometheus, three_region_cluster, tmp_path):
    import ray
    from ray import serve

    from mlplatform.serve import build_app, create_key

    root, keys = tmp_path / "registry", tmp_path / "keys"
    register_digits(root, tmp_path / "artifacts")
    port = serve_on_free_port(three_region_cluster)
    spec = {
        "name": "metered", "model": "digits@production", "registry_root": str(root),
        "primary": {"replicas": 1, "num_cpus": 0.5, "label_selector": {"ray.io/node-group": "cpu"},
                    "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02},
                    "cache": {"enabled": True, "max_bytes": 1 << 20}},
        "ingress": {"replicas": 1, "num_cpus": 0.1}, "auth": {"keys_dir": str(keys)}, "limits": {"max_rows": 16},
    }
    try:
        serve.run(build_app(spec), name="metered", route_prefix="/")
        key = create_key("metered", keys_dir=keys).key
        base = f"https://127.0.0.1:{port}/v1/predict"
        x, _ = digits_data()

        def one(i):
            return requests.post(base, json={"inputs": [x[i].tolist()]}, headers={"X-API-Key": key},
                                 timeout=30).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(one, range(80)))
        assert set(codes) == {200}
        assert requests.post(base, json={"inputs": [[0.0] * 3]}, headers={"X-API-Key": key}, timeout=30).status_code == 422
        # The response cache (on for this app): a repeated request is answered without the model
        # (X-Batch-Rows 0: it joined no batch), with the same outputs.
        first = requests.post(base, json={"inputs": [x[0].tolist()]}, headers={"X-API-Key": key}, timeout=30)
        again = [requests.post(base, json={"inputs": [x[0].tolist()]}, headers={"X-API-Key": key}, timeout=30)
                 for _ in range(3)]
        assert all(r.json()["outputs"] == first.json()["outputs"] for r in again)
        assert [r.headers["X-Batch-Rows"] for r in again] == ["0"] * 3

        ok = _until(prometheus, 'ray_mlplatform_serve_requests_total{app="metered",code="200"}',
                    lambda r: sum(float(s["value"][1]) for s in r) >= 80)
        labels = ok[0]["metric"]
        assert labels["version"] == "digits@1" and labels["served_by"] == "primary/onnx_int8"
        refused = _until(prometheus, 'ray_mlplatform_serve_requests_total{app="metered",code="422"}')
        assert refused[0]["metric"]["version"] == "digits@1"
        latency = _until(prometheus, 'ray_mlplatform_serve_request_latency_ms_bucket{app="metered",version="digits@1"}')
        assert {float(s["metric"]["le"]) for s in latency} >= {1.0, 100.0, float("inf")}
        calls = _until(prometheus, 'ray_mlplatform_serve_batch_rows_count{app="metered",deployment="primary"}')
        assert calls[0]["metric"]["version"] == "digits@1" and float(calls[0]["value"][1]) > 0
        buckets = _query(prometheus, 'ray_mlplatform_serve_batch_rows_bucket{app="metered",deployment="primary"}')
        assert {float(s["metric"]["le"]) for s in buckets} >= {1.0, 16.0, float("inf")}
        hits = _until(prometheus, 'ray_mlplatform_serve_cache_requests_total{app="metered",result="hit"}',
                      lambda r: sum(float(s["value"][1]) for s in r) >= 4)
        assert hits[0]["metric"]["deployment"] == "primary" and hits[0]["metric"]["version"] == "digits@1"
        _until(prometheus, 'ray_mlplatform_serve_cache_requests_total{app="metered",result="miss"}',
               lambda r: sum(float(s["value"][1]) for s in r) == 80)
        _until(prometheus, 'ray_mlplatform_serve_cache_bytes{app="metered"}',
               lambda r: any(float(s["value"][1]) > 0 for s in r))
        # Exact rows: 80 one-row requests reached the model; the 422 and the 4 cache hits never did.
        # (The histogram's _sum is not asserted: Ray 2.60 rebuilds histograms from bucket midpoints.)
        _until(prometheus, 'ray_mlplatform_serve_rows_total{app="metered",deployment="primary"}',
               lambda r: sum(float(s["value"][1]) for s in r) == 80)
    finally:
        serve.shutdown()
        ray.shutdown()
