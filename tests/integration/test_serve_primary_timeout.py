"""A primary that misses `fallback.primary_timeout_s`: the fallback answers and the primary's
request is cancelled on its replica instead of running on for nobody.

The ingress is the real one; both models are `CountingModel`s (tests/serve_models.py), so the
primary can be made slow and its calls counted on the replica.
"""

from __future__ import annotations

import time

import pytest
import requests

import serve_models
from serve_models import CountingModel, digits_data, serve_on_free_port

pytestmark = pytest.mark.timeout(300)

PRIMARY_DELAY_S = 6.0
TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def slow_primary(three_region_cluster):
    import ray
    from ray import cloudpickle, serve

    from mlplatform.serve._ingress import Ingress

    port = serve_on_free_port(three_region_cluster)
    # The replicas cannot import the tests' modules: ship CountingModel by value.
    cloudpickle.register_pickle_by_value(serve_models)
    # The settings `build_app` gives an ingress with a fallback (see mlplatform.serve._app).
    settings = {
        "app": "slow", "version": "slow@1", "canary_version": None, "canary_percent": 0,
        "variants": {"primary": "slow", "fallback": "fast"},
        "contract": {"input_name": "input", "dtype": "float32", "features": (64,), "max_rows": 8,
                     "max_payload_bytes": 65536},
        "auth": False, "keys_dir": "", "retry_after_s": 1.0, "primary_timeout_s": TIMEOUT_S, "poll_interval_s": 1.0,
    }
    model = serve.deployment(CountingModel).options(ray_actor_options={"num_cpus": 0.1}, num_replicas=1)
    app = serve.deployment(Ingress).options(name="ingress", ray_actor_options={"num_cpus": 0.1}).bind(
        settings, model.options(name="primary").bind(PRIMARY_DELAY_S), model.options(name="fallback").bind(0.0))
    try:
        serve.run(app, name="slow", route_prefix="/slow")
        yield f"https://127.0.0.1:{port}/slow", serve.get_deployment_handle("primary", app_name="slow")
    finally:
        cloudpickle.unregister_pickle_by_value(serve_models)
        serve.shutdown()
        ray.shutdown()


def test_a_timed_out_primary_request_is_cancelled_on_its_replica(slow_primary):
    base, primary = slow_primary
    x, _ = digits_data()
    start = time.monotonic()
    r = requests.post(base + "/v1/predict", json={"inputs": x[:2].tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["X-Served-By"] == "fallback/fast" and r.headers["X-Fallback"] == "primary_timeout"
    assert time.monotonic() - start < PRIMARY_DELAY_S
    time.sleep(PRIMARY_DELAY_S + 2)  # long past the moment the primary would have finished
    assert primary.counts.remote().result() == {"started": 1, "finished": 0}
