"""Serve autoscaling of a model deployment on the live cluster: sustained concurrent load adds
replicas (up to max_replicas); when the load stops they are removed again (down to min_replicas).
Both shapes: a separate model deployment (`primary`), and the model colocated in the ingress
(`ingress`, as serve_apps/digits-cpu.yaml ships), which scales by the primary's settings.

Short delays and look-back, a target of one ongoing request per replica and a batch wait of
50 ms (each request stays ongoing at least that long) make eight closed-loop callers enough.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from serve_models import digits_data, register_digits, serve_on_free_port

pytestmark = pytest.mark.timeout(300)


def _running(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _wait(app: str, deployment: str, want, timeout: float) -> list[int]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        seen.append(_running(app, deployment))
        if want(seen[-1]):
            return seen
        time.sleep(1)
    raise AssertionError(f"replica count never satisfied the condition; seen {seen}")


@pytest.mark.parametrize("colocate", [False, True], ids=["split", "colocated"])
def test_load_adds_replicas_and_they_go_after(three_region_cluster, tmp_path, colocate):
    import ray
    from ray import serve

    from mlplatform.serve import build_app

    root = tmp_path / "registry"
    register_digits(root, tmp_path / "artifacts")
    port = serve_on_free_port(three_region_cluster)
    spec = {
        "name": "scaling", "model": "digits@production", "registry_root": str(root),
        "primary": {"num_cpus": 0.5, "label_selector": {"ray.io/node-group": "cpu"},
                    "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
                    "autoscaling": {"preset": "latency", "min_replicas": 1, "initial_replicas": 1, "max_replicas": 3,
                                    "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 3,
                                    "look_back_period_s": 2}},
        "ingress": {"colocate": True} if colocate else {"replicas": 1, "num_cpus": 0.1},
        "auth": {"enabled": False}, "drift": {"enabled": False},
        "limits": {"max_rows": 4},
    }
    deployment = "ingress" if colocate else "primary"
    x, _ = digits_data()
    stop, codes = threading.Event(), []

    def caller(i: int) -> None:
        while not stop.is_set():
            r = requests.post(f"https://127.0.0.1:{port}/v1/predict", json={"inputs": [x[i].tolist()]}, timeout=30)
            codes.append(r.status_code)

    try:
        serve.run(build_app(spec), name="scaling", route_prefix="/")
        assert _running("scaling", deployment) == 1
        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        try:
            up = _wait("scaling", deployment, lambda n: n >= 2, timeout=45)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert len(codes) > 50 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}
        down = _wait("scaling", deployment, lambda n: n == 1, timeout=45)
        print(f"replicas under load: {up}; after: {down}")
    finally:
        serve.shutdown()
        ray.shutdown()
