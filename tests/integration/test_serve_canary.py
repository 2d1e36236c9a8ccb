"""Canary traffic on live Serve applications: the sticky percentage split, and the canary gate
rolling a failing canary back (alias history records why) or promoting a healthy one.

Each test deploys its own application next to the others on one Serve instance for the
module; each gated test has its own model name in one temp registry, so alias moves never
interfere. Auth is off here so a caller is named by `X-Caller-Id` (with keys, the key id
is the caller; that path is the same hash).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from serve_models import digits_data, ray_metric, register_digits, serve_on_free_port

pytestmark = pytest.mark.timeout(600)

X, _ = digits_data()


def _spec(name: str, model: str, root, canary: dict) -> dict:
    small = {"replicas": 1, "num_cpus": 0.25, "label_selector": {"ray.io/node-group": "cpu"},
             "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.002}}
    return {
        "name": name, "model": f"{model}@production", "registry_root": str(root), "primary": small,
        "canary": {"deployment": small, **canary},
        "ingress": {"replicas": 1, "num_cpus": 0.1}, "auth": {"enabled": False}, "drift": {"enabled": False},
        "limits": {"max_rows": 8},
    }


@pytest.fixture(scope="module")
def serving(three_region_cluster, internal_root):
    import ray
    from ray import serve

    # Registered while connected, under the cluster's policy: unclassified test models are
    # `internal` (the default), stored under that classification's prefix.
    work = internal_root / "canary"
    port = serve_on_free_port(three_region_cluster)
    try:
        yield f"https://127.0.0.1:{port}", work / "registry", work / "artifacts"
    finally:
        serve.shutdown()
        ray.shutdown()


def _predict(url: str, caller: str, row: int = 0) -> requests.Response:
    return requests.post(url + "/v1/predict", json={"inputs": [X[row].tolist()]},
                         headers={"X-Caller-Id": caller}, timeout=30)


def _drive_until(url: str, state: str, callers: list[str], timeout: float = 60) -> dict:
    """Send traffic from `callers` until the ingress reports the gate in `state`."""
    deadline = time.time() + timeout
    with ThreadPoolExecutor(4) as pool:
        while time.time() < deadline:
            list(pool.map(lambda c: _predict(url, c), callers))
            gate = requests.get(url + "/healthz", timeout=10).json()["canary_gate"]
            if gate and gate["state"] == state:
                return gate
    raise AssertionError(f"canary gate never reached {state!r}: {gate}")


def test_split_is_sticky_per_caller_and_near_the_percentage(serving):
    from ray import serve

    from mlplatform import registry
    from mlplatform.serve import build_app

    base, root, artifacts = serving
    register_digits(root, artifacts, "split")
    register_digits(root, artifacts, "split", alias="canary", scale=2.0)  # valid, different outputs
    serve.run(build_app(_spec("split", "split", root, {"model": "split@canary", "percent": 30})),
              name="split", route_prefix="/split")
    url = base + "/split"
    callers = [f"caller-{i}" for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda c: _predict(url, c), callers))
    assert all(r.status_code == 200 for r in first)
    side = {c: r.headers["X-Model-Version"] for c, r in zip(callers, first)}
    assert set(side.values()) == {"split@1", "split@2"}
    share = sum(v == "split@2" for v in side.values()) / len(side)
    assert 0.2 <= share <= 0.4, share  # 30% of 200 callers; binomial sd about 3.2 points
    # The canary really is the other version: its outputs are twice the primary's.
    outputs = {v: np.array(r.json()["outputs"]) for r, v in zip(first, side.values())}
    np.testing.assert_allclose(outputs["split@2"], 2 * outputs["split@1"], rtol=1e-4, atol=1e-4)
    # Sticky: every caller lands on the same version again, request after request.
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            again = list(pool.map(lambda c: (c, _predict(url, c, row=7).headers["X-Model-Version"]), callers[:60]))
        assert all(side[c] == v for c, v in again)
    assert registry.list_aliases("split", root=str(root)) == {"canary": 2, "production": 1}  # no gate: no moves


def test_gate_rolls_back_a_failing_canary_and_records_why(serving, three_region_cluster):
    from ray import serve

    from mlplatform import registry
    from mlplatform.serve import build_app

    base, root, artifacts = serving
    register_digits(root, artifacts, "bad")  # v1: production
    registry.set_alias("bad", "canary", 1, root=str(root))
    register_digits(root, artifacts, "bad", alias="canary", broken=True)  # v2: every prediction fails
    gate = {"window_s": 3, "min_requests": 10, "max_error_rate": 0.05, "max_p99_ms": 2000}
    serve.run(build_app(_spec("bad", "bad", root, {"model": "bad@canary", "percent": 50, "gate": gate})),
              name="bad", route_prefix="/bad")
    url = base + "/bad"
    callers = [f"c{i}" for i in range(20)]
    before = [_predict(url, c) for c in callers]
    assert {r.status_code for r in before} == {200, 500}  # callers on the canary get its failures
    assert all(r.json()["error"]["code"] == "model_error" for r in before if r.status_code == 500)

    verdict = _drive_until(url, "rolled_back", callers)
    assert "error rate" in verdict["reason"] and verdict["stats"]["error_rate"] > 0.05
    assert verdict["alias_move"] == {"alias": "canary", "action": "rollback", "from": 2, "to": 1}
    last = registry.alias_history("bad", "canary", root=str(root))[-1]
    assert (last.action, last.from_version, last.to_version, last.actor) == ("rollback", 2, 1, "canary-gate")
    assert "error rate" in last.reason and "max_error_rate" in last.reason
    assert registry.list_aliases("bad", root=str(root)) == {"canary": 1, "production": 1}
    # Traffic no longer goes to the canary: every caller, even those hashed to it, gets v1.
    after = [_predict(url, c) for c in callers]
    assert all(r.status_code == 200 and r.headers["X-Model-Version"] == "bad@1" for r in after)
    assert requests.get(url + "/healthz", timeout=10).json()["canary_percent"] == 0
    # The verdict is a metric too (dashboards, alerting on a rollback), with the window's figures.
    states = ray_metric(three_region_cluster, "ray_mlplatform_serve_canary_gate_state",
                        want=lambda ss: any(l.get("app") == "bad" and l["state"] == "rolled_back" and v == 1
                                            for l, v in ss))
    assert {l["state"]: v for l, v in states if l.get("app") == "bad"} == {
        "watching": 0, "rolled_back": 1, "promoted": 0}
    figures = ray_metric(three_region_cluster, "ray_mlplatform_serve_canary_gate_window",
                         want=lambda ss: any(l.get("app") == "bad" for l, _ in ss))
    assert {l["figure"]: v for l, v in figures if l.get("app") == "bad"}["error_rate"] > 0.05


def test_gate_promotes_a_healthy_canary(serving):
    from ray import serve

    from mlplatform import registry
    from mlplatform.serve import build_app

    base, root, artifacts = serving
    register_digits(root, artifacts, "good")
    register_digits(root, artifacts, "good", alias="canary", seed=1)
    gate = {"window_s": 3, "min_requests": 10, "max_error_rate": 0.05, "max_p99_ms": 5000}
    serve.run(build_app(_spec("good", "good", root, {"model": "good@canary", "percent": 50, "gate": gate})),
              name="good", route_prefix="/good")
    url = base + "/good"
    callers = [f"c{i}" for i in range(20)]
    verdict = _drive_until(url, "promoted", callers)
    assert verdict["stats"]["errors"] == 0 and verdict["stats"]["requests"] >= 10
    assert verdict["alias_move"] == {"alias": "production", "action": "promote", "from": 1, "to": 2}
    last = registry.alias_history("good", "production", root=str(root))[-1]
    assert (last.action, last.source_alias, last.to_version, last.actor) == ("promote", "canary", 2, "canary-gate")
    assert last.reason.startswith("canary gate passed")
    assert registry.list_aliases("good", root=str(root)) == {"canary": 2, "production": 2}
    # Until the app is redeployed on the new production, every caller is sent to the promoted version.
    assert all(_predict(url, c).headers["X-Model-Version"] == "good@2" for c in callers)
