"""Live Serve applications on the three-region cluster: predictions, batching, placement, auth,
the request contract (with a fuzz), overload, and GPU→CPU fallback.

Three applications share one Serve instance for the module: `digits` (ONNX INT8 on the cpu
group), `tiny` (tight limits, to overload) and `hybrid` (primary on the gpu group, fallback
on the cpu group). Serve is shut down when the module ends.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_models import digits_data, ray_metric, register_digits, run_onnx, serve_on_free_port

pytestmark = pytest.mark.timeout(600)


class Served:
    def __init__(self, base: str, root: Path, keys: Path, files: Path, key: str, tiny_key: str):
        self.base, self.root, self.keys, self.files, self.key, self.tiny_key = base, root, keys, files, key, tiny_key

    def post(self, path: str, body, key: str | None = "default", **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        if key == "default":
            key = self.key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return requests.post(self.base + path, data=data, headers=headers, timeout=30, **kw)


def _spec(name: str, root: Path, keys: Path, **over) -> dict:
    spec = {
        "name": name, "model": "digits@production", "registry_root": str(root),
        "primary": {"replicas": 1, "label_selector": {"ray.io/node-group": "cpu"}, "num_cpus": 1,
                    "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.02}},
        "ingress": {"replicas": 1, "num_cpus": 0.1, "label_selector": {"ray.io/availability-region": "me-central-1"}},
        "auth": {"keys_dir": str(keys)},
        "limits": {"max_rows": 32, "max_payload_bytes": 65536},
    }
    spec.update(over)
    return spec


def _hybrid(root: Path, keys: Path, gpu_group: str = "gpu") -> dict:
    return _spec(
        "hybrid", root, keys,
        primary={"variant": "onnx_fp32", "replicas": 1, "num_cpus": 1,
                 "label_selector": {"ray.io/node-group": gpu_group}},
        fallback={"primary_timeout_s": 3, "deployment": {"variant": "onnx_int8", "replicas": 1, "num_cpus": 0.5,
                                                         "label_selector": {"ray.io/node-group": "cpu"}}},
    )


@pytest.fixture(scope="module")
def served(three_region_cluster, tmp_path_factory):
    import ray
    from ray import serve

    from mlplatform.serve import build_app, create_key

    work = tmp_path_factory.mktemp("serve")
    root, keys = work / "registry", work / "keys"
    version = register_digits(root, work / "artifacts")
    files = next((work / "artifacts").glob("digits-*"))
    port = serve_on_free_port(three_region_cluster)
    try:
        serve.run(build_app(_spec("digits", root, keys)), name="digits", route_prefix="/")
        tiny = _spec("tiny", root, keys, primary={
            "replicas": 1, "num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1,
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3}}, limits={"max_rows": 4})
        serve.run(build_app(tiny), name="tiny", route_prefix="/tiny")
        serve.run(build_app(_hybrid(root, keys)), name="hybrid", route_prefix="/hybrid")
        assert version.ref == "digits@1"
        yield Served(f"https://127.0.0.1:{port}", root, keys, files, create_key("digits", keys_dir=keys).key,
                     create_key("tiny", keys_dir=keys).key)
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas(app: str, deployment: str) -> list[dict]:
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"),
                                            ("state", "=", "ALIVE")], detail=True)]


def _codes_while_killing(served, path: str, key: str, app: str, deployment: str, callers: int,
                         before_s: float = 1.5, after_s: float = 3.0) -> list[int]:
    """Status codes of `callers` threads posting rows to `path` while one replica of `deployment` is killed."""
    import ray

    x, _ = digits_data()
    codes, stop = [], threading.Event()

    def load(i):
        while not stop.is_set():
            codes.append(served.post(path, {"inputs": [x[i].tolist()]}, key=key).status_code)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    victim = _replicas(app, deployment)[0]
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join()
    return codes


def test_predictions_equal_the_registered_model(served):
    x, _ = digits_data()
    r = served.post("/v1/predict", {"inputs": x[:5].tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    local = run_onnx(served.files / "model.int8.onnx", x[:5])
    np.testing.assert_allclose(np.array(body["outputs"]), local, rtol=1e-5, atol=1e-5)
    assert body["predictions"] == local.argmax(axis=1).tolist()
    assert r.headers["X-Model-Version"] == "digits@1" == body["model"]
    assert r.headers["X-Served-By"] == "primary/onnx_int8"


def test_only_https_reaches_the_model(served):
    # The session cluster runs with TLS: Serve's proxy speaks HTTPS only (certificate from the
    # cluster's CA, verified here through REQUESTS_CA_BUNDLE); plain HTTP on its port is dropped.
    assert served.base.startswith("https://")
    x, _ = digits_data()
    with pytest.raises(requests.ConnectionError):
        requests.post(served.base.replace("https://", "http://") + "/v1/predict", json={"inputs": x[:1].tolist()},
                      headers={"Authorization": f"Bearer {served.key}"}, timeout=10)


def test_open_endpoints_need_no_key(served):
    schema = requests.get(served.base + "/openapi.json", timeout=10).json()
    assert "/v1/predict" in schema["paths"]
    assert requests.get(served.base + "/docs", timeout=10).status_code == 200
    health = requests.get(served.base + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "digits@1"
    # The contract needs a `predict` or `metrics` key (test_serve_key_lifecycle.py covers the scopes).
    assert requests.get(served.base + "/v1/contract", timeout=10).status_code == 401
    contract = requests.get(served.base + "/v1/contract", headers={"Authorization": f"Bearer {served.key}"},
                            timeout=10).json()
    assert contract["row_shape"] == [64] and contract["max_rows"] == 32


def test_keys_401_403_and_revocation(served):
    from mlplatform.serve import create_key, revoke_key

    body = {"inputs": [[0.0] * 64]}
    assert served.post("/v1/predict", body, key=None).status_code == 401
    assert served.post("/v1/predict", body, key="mlp.digits.0123456789ab.nope").status_code == 401
    assert served.post("/v1/predict", body, key="garbage").status_code == 401
    other = served.post("/v1/predict", body, key=served.tiny_key)  # a valid key, for another application
    assert other.status_code == 403 and other.json()["error"]["code"] == "forbidden"
    made = create_key("digits", keys_dir=served.keys)
    r = requests.post(served.base + "/v1/predict", json=body, headers={"X-API-Key": made.key}, timeout=10)
    assert r.status_code == 200
    revoke_key("digits", made.record.key_id, keys_dir=served.keys)
    time.sleep(1.5)  # the ingress re-reads a changed key file at most once a second
    assert served.post("/v1/predict", body, key=made.key).status_code == 401


def test_concurrent_requests_are_batched(served):
    x, _ = digits_data()

    def one(i):
        r = served.post("/v1/predict", {"inputs": [x[i].tolist()]})
        return r.status_code, int(r.headers.get("X-Batch-Rows", 0))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(96)))
    assert all(code == 200 for code, _ in results)
    assert max(rows for _, rows in results) > 1


def test_replicas_land_on_the_node_groups_they_ask_for(served):
    import ray

    labels = {n["NodeID"]: n.get("Labels", {}) for n in ray.nodes()}
    for app, deployment, group in [("digits", "primary", "cpu"), ("hybrid", "primary", "gpu"),
                                   ("hybrid", "fallback", "cpu")]:
        actors = _replicas(app, deployment)
        assert actors, f"{app}/{deployment} has no live replica"
        assert {labels[a["node_id"]].get("ray.io/node-group") for a in actors} == {group}
    for a in _replicas("digits", "ingress"):
        assert labels[a["node_id"]]["ray.io/availability-region"] == "me-central-1"


BAD = [
    (b"not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_body"),
    (b'{"rows": []}', 400, "unknown_field"),
    (b"{}", 400, "missing_inputs"),
    (b'{"inputs": "x"}', 422, "not_a_list"),
    (b'{"inputs": []}', 422, "empty"),
    (b'{"inputs": [[1, 2, 3]]}', 422, "shape_mismatch"),
    (json.dumps({"inputs": [[0.0] * 64, [0.0] * 63]}).encode(), 422, "shape_mismatch"),
    (json.dumps({"inputs": [["0.5"] * 64]}).encode(), 422, "dtype_mismatch"),
    (json.dumps({"inputs": [[True] * 64]}).encode(), 422, "dtype_mismatch"),
    (json.dumps({"inputs": [[0.0] * 63 + [None]]}).encode(), 422, "dtype_mismatch"),
    (b'{"inputs": [[' + b"0," * 63 + b"NaN]]}", 422, "non_finite"),
    (b'{"inputs": [[' + b"0," * 63 + b"1e300]]}", 422, "non_finite"),
    (json.dumps({"inputs": [[0.0] * 64] * 33}).encode(), 413, "too_many_rows"),
    (b'{"inputs": [[' + b"0," * 40000 + b"0]]}", 413, "payload_too_large"),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[c for _, _, c in BAD])
def test_bad_input_is_refused_with_a_named_problem(served, body, status, code):
    r = served.post("/v1/predict", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_bad_input_never_reaches_or_hurts_the_replica(served):
    before = {a["actor_id"] for a in _replicas("digits", "primary")}
    for body, _, _ in BAD:
        served.post("/v1/predict", body)
    # Chunked upload without Content-Length: the streamed size check still applies.
    r = requests.post(served.base + "/v1/predict", data=iter([b'{"inputs": [[', b"0," * 40000, b"0]]}"]),
                      headers={"Authorization": f"Bearer {served.key}"}, timeout=30)
    assert r.status_code == 413
    assert {a["actor_id"] for a in _replicas("digits", "primary")} == before
    assert served.post("/v1/predict", {"inputs": [[0.0] * 64]}).status_code == 200


def test_a_client_gone_mid_body_is_499_not_a_server_error(served, three_region_cluster):
    import socket
    from urllib.parse import urlparse

    before = {a["actor_id"] for a in _replicas("digits", "ingress")}
    from mlplatform.serve import https_context

    url = urlparse(served.base)
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection((url.hostname, url.port), timeout=10))
        if url.scheme == "https":  # the raw request goes inside TLS, verified against the cluster's CA
            s = stack.enter_context(https_context(str(three_region_cluster.tls().ca_cert)).wrap_socket(
                s, server_hostname=url.hostname))
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + served.key.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
                  b'{"inputs": [[0.0,')
        time.sleep(1)  # the ingress is now waiting for the rest of the body
    # Counted as 499 (client closed request), not as a 500 that would count against the model.
    ray_metric(three_region_cluster, "ray_mlplatform_serve_requests_total",
               want=lambda ss: any(l.get("app") == "digits" and l["code"] == "499" for l, _ in ss))
    assert {a["actor_id"] for a in _replicas("digits", "ingress")} == before
    assert served.post("/v1/predict", {"inputs": [[0.0] * 64]}).status_code == 200


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False),
                       st.text(max_size=5))
_rows = st.lists(st.lists(st.one_of(st.floats(-1e6, 1e6), st.integers(-5, 5), _json_leaf), min_size=0, max_size=70),
                 max_size=40)
_bodies = st.one_of(
    st.builds(lambda r: {"inputs": r}, _rows),
    st.recursive(_json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                 max_leaves=12),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(body=_bodies)
def test_fuzzed_requests_never_get_a_5xx(served, body):
    r = served.post("/v1/predict", json.dumps(body))
    assert r.status_code in (200, 400, 413, 422), r.text
    assert r.status_code == 200 or "error" in r.json()


def test_overload_gets_503_with_retry_after(served):
    x, _ = digits_data()

    def one(i):
        r = served.post("/tiny/v1/predict", {"inputs": [x[i].tolist()]}, key=served.tiny_key)
        return r.status_code, r.headers.get("Retry-After")

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(48)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes
    assert all(retry == "1" for c, retry in results if c == 503)


def test_fallback_when_the_gpu_deployment_has_no_replica(served):
    from ray import serve

    from mlplatform.serve import build_app, create_key

    key = create_key("hybrid", keys_dir=served.keys).key
    x, _ = digits_data()
    r = served.post("/hybrid/v1/predict", {"inputs": x[:4].tolist()}, key=key)
    assert r.status_code == 200 and r.headers["X-Served-By"] == "primary/onnx_fp32"
    assert "X-Fallback" not in r.headers
    # Spot GPUs reclaimed: the gpu deployment's replica can be placed on no live node, so it
    # stays pending (a selector naming a group with no nodes stands in for the emptied gpu group).
    from ray.serve.api import RunTarget

    serve.run_many([RunTarget(build_app(_hybrid(served.root, served.keys, "gpu-reclaimed")), "hybrid", "/hybrid")],
                   wait_for_applications_running=False)
    deadline = time.time() + 30
    while _replicas("hybrid", "primary") and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.5)  # one poll of the ingress
    r = served.post("/hybrid/v1/predict", {"inputs": x[:4].tolist()}, key=key)
    assert r.status_code == 200, r.text
    assert r.headers["X-Served-By"] == "fallback/onnx_int8"
    assert r.headers["X-Fallback"] == "no_healthy_replica"
    np.testing.assert_allclose(r.json()["outputs"], run_onnx(served.files / "model.int8.onnx", x[:4]), atol=1e-5)
    health = requests.get(served.base + "/hybrid/healthz", timeout=10).json()
    assert health["running_replicas"]["primary"] == 0


@pytest.mark.slow
def test_replica_killed_under_load_loses_under_one_percent(served):
    from ray import serve

    from mlplatform.serve import build_app, create_key

    serve.run(build_app(_hybrid(served.root, served.keys)), name="hybrid", route_prefix="/hybrid")
    key = create_key("hybrid", keys_dir=served.keys).key
    codes = _codes_while_killing(served, "/hybrid/v1/predict", key, "hybrid", "primary", callers=6, before_s=2,
                                 after_s=4)
    assert len(codes) > 50
    assert sum(c == 200 for c in codes) / len(codes) >= 0.99, {c: codes.count(c) for c in set(codes)}


# --- issue 16: contract fixes, the Open Inference Protocol (tritonclient), the schema (schemathesis) ---

def test_non_json_bodies_get_415_and_a_flat_row_422(served):
    x, _ = digits_data()
    r = served.post("/v1/predict", {"inputs": x[:1].tolist()}, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    r = served.post("/v1/predict", {"inputs": x[0].tolist()})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] == ("one row must be a list of 64 numbers; got a number at inputs[0]; "
                                            "expected shape [rows, 64].")
    # What the schema says of `[[]]` (a row of exactly 64 numbers) the app says too.
    schema = requests.get(served.base + "/openapi.json", timeout=30).json()
    row = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert row["properties"]["inputs"]["items"]["minItems"] == 64 == row["properties"]["inputs"]["items"]["maxItems"]
    assert row["properties"]["inputs"]["maxItems"] == 32
    assert {"bearer", "apiKey"} <= set(schema["components"]["securitySchemes"])
    assert served.post("/v1/predict", {"inputs": [[]]}).status_code == 422


def _triton(served, key: str | None):
    import ssl

    import tritonclient.http as triton

    ca = Path(__import__("os").environ["SSL_CERT_FILE"])  # the cluster CA (serve_models.https_options)
    client = triton.InferenceServerClient(served.base.removeprefix("https://"), ssl=True,
                                          ssl_context_factory=lambda **_: ssl.create_default_context(cafile=str(ca)))
    return client, ({"Authorization": f"Bearer {key}"} if key else None)


def test_tritonclient_metadata_readiness_and_classes_with_a_key(served):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client, headers = _triton(served, served.key)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    meta = client.get_model_metadata("digits", headers=headers)
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "class"]
    x, _ = digits_data()
    local = run_onnx(served.files / "model.int8.onnx", x[:3])
    for binary in (True, False):  # tritonclient's default is the binary tensor data extension
        tensor = triton.InferInput("input", [3, 64], "FP32")
        tensor.set_data_from_numpy(x[:3], binary_data=binary)
        wanted = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "class")]
        # A fresh dict per call: tritonclient writes Inference-Header-Content-Length into the one it is given.
        result = client.infer("digits", [tensor], outputs=wanted, request_id="r-1", headers=dict(headers))
        assert result.get_response()["model_version"] == "1" and result.get_response()["id"] == "r-1"
        probabilities = result.as_numpy("probabilities")
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert result.as_numpy("class").tolist() == local.argmax(axis=1).tolist()
    everything = client.infer("digits", [tensor], model_version="1", headers=dict(headers))  # no outputs named: all, binary
    np.testing.assert_allclose(everything.as_numpy("logits"), local, rtol=1e-5, atol=1e-5)
    for key in (None, "mlp.digits.0123456789ab.nope"):
        bad_client, bad = _triton(served, key)
        with pytest.raises(InferenceServerException, match=r"\[401\]"):
            bad_client.infer("digits", [tensor], headers=dict(bad) if bad else None)
    with pytest.raises(InferenceServerException, match=r"\[404\].*'digits'"):
        client.get_model_metadata("nope", headers=headers)


def test_v2_json_tensors_flat_or_nested_and_errors_in_protocol_form(served):
    x, _ = digits_data()
    tensor = {"name": "input", "shape": [2, 64], "datatype": "FP32"}
    flat = served.post("/v2/models/digits/infer", {"id": "a", "inputs": [{**tensor, "data": x[:2].ravel().tolist()}]})
    nested = served.post("/v2/models/digits/infer", {"inputs": [{**tensor, "data": x[:2].tolist()}],
                                                       "outputs": [{"name": "class"}]})
    assert flat.status_code == 200 == nested.status_code, (flat.text, nested.text)
    assert flat.json()["id"] == "a" and [o["name"] for o in flat.json()["outputs"]] == ["logits", "probabilities",
                                                                                      "class"]
    assert nested.json()["outputs"] == [o for o in flat.json()["outputs"] if o["name"] == "class"]
    for body, status in [({"inputs": [{**tensor, "data": x[:1].ravel().tolist()}]}, 422),
                         ({"inputs": [{**tensor, "datatype": "INT64", "data": [0] * 128}]}, 400),
                         ({"inputs": [{**tensor, "shape": [33, 64], "data": [0.0] * 33 * 64}]}, 413)]:
        r = served.post("/v2/models/digits/infer", body)
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text
    assert served.post("/v2/models/digits/infer", {"inputs": []}, key=None).status_code == 401


def test_schemathesis_all_checks_pass_against_the_served_schema(served, tmp_path):
    import os
    import subprocess
    import sys

    # 413 is how this API refuses too many rows or bytes (documented on every POST); schemathesis's
    # negative-data check does not list it by default.
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.negative_data_rejection]\nexpected-statuses = ["400", "401", "403", "404", "405", '
                      '"406", "409", "413", "415", "422", "428", "429"]\n')
    start = time.time()
    run = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run",
         served.base + "/openapi.json", "--checks", "all", "--header", f"Authorization: Bearer {served.key}",
         "--tls-verify", os.environ["SSL_CERT_FILE"], "--max-examples", "15", "--seed", "16",
         # One worker: hypothesis's lambda-source cache is not thread-safe (a FlakyFailure in its own code).
         "--workers", "1", "--request-timeout", "30", "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"},
    )
    (tmp_path / "schemathesis.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
    print(f"schemathesis: {time.time() - start:.0f}s")


def test_model_replica_killed_under_load_gets_no_500(served):
    codes = _codes_while_killing(served, "/v1/predict", served.key, "digits", "primary", callers=4)
    counts = {c: codes.count(c) for c in set(codes)}
    assert len(codes) > 20 and set(counts) <= {200, 503}, counts  # inference is idempotent: retried, else 503


@pytest.mark.slow
def test_colocated_replica_killed_under_load_gets_no_500(served):
    # The replica that dies is the whole app here (ingress and model in one): the Serve proxy's
    # middleware (serve/_proxy.py, on every node of a platform cluster) replays what it dropped.
    from ray import serve

    from mlplatform.serve import build_app, create_key

    spec = _spec("solo", served.root, served.keys, ingress={"colocate": True}, primary={
        "replicas": 2, "num_cpus": 0.25, "label_selector": {"ray.io/availability-region": "me-central-1"},
        "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.001}})
    serve.run(build_app(spec), name="solo", route_prefix="/solo")
    try:
        key = create_key("solo", keys_dir=served.keys).key
        codes = _codes_while_killing(served, "/solo/v1/predict", key, "solo", "ingress", callers=6)
        counts = {c: codes.count(c) for c in set(codes)}
        assert len(codes) > 20 and set(counts) <= {200, 503}, counts
    finally:
        serve.delete("solo")
