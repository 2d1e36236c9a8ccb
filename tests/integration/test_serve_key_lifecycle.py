"""API key lifecycle on a live application: scopes, expiry, quotas, query-string keys, oversized
headers, and revocation honoured by every ingress replica within 5 s.

One application (`keys`, two colocated ingress replicas, so the model runs in-process and no
separate model deployment is started) serves every test of the module; keys are made per test.
"""

from __future__ import annotations

import time

import pytest
import requests

from serve_models import digits_data, register_digits, serve_on_free_port

pytestmark = pytest.mark.timeout(300)

APP = "keys"


class Live:
    def __init__(self, base: str, keys_dir, expired_key: str):
        self.base, self.keys_dir, self.expired_key = base, keys_dir, expired_key
        self.body = {"inputs": digits_data()[0][:1].tolist()}

    def key(self, app: str = APP, **kw) -> tuple[str, str]:
        from mlplatform.serve import create_key

        made = create_key(app, keys_dir=self.keys_dir, **kw)
        return made.key, made.record.key_id

    def predict(self, key: str | None, **kw) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.base}/v1/predict", json=self.body, headers=headers | kw.pop("headers", {}),
                             timeout=30, **kw)


@pytest.fixture(scope="module")
def live(three_region_cluster, tmp_path_factory):
    import ray
    from ray import serve

    from mlplatform.serve import build_app, create_key, endpoint

    work = tmp_path_factory.mktemp("keys")
    root, keys_dir = work / "registry", work / "keys"
    register_digits(root, work / "artifacts")
    # Made before the deployment, so it has expired by the time the tests run.
    expired = create_key(APP, expires="1s", keys_dir=keys_dir).key
    serve_on_free_port(three_region_cluster)
    spec = {
        "name": APP, "model": "digits@production", "registry_root": str(root), "auth": {"keys_dir": str(keys_dir)},
        "ingress": {"colocate": True},
        "primary": {"replicas": 2, "num_cpus": 0.25, "label_selector": {"ray.io/node-group": "cpu"}},
    }
    try:
        serve.run(build_app(spec), name=APP, route_prefix=f"/{APP}")
        yield Live(endpoint(APP, cluster=three_region_cluster.name), keys_dir, expired)
    finally:
        serve.shutdown()
        ray.shutdown()


def _refusal(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == code, error
    return error


def test_valid_key_200_expired_401_wrong_scope_or_app_403(live):
    key, _ = live.key()
    assert live.predict(key).status_code == 200
    error = _refusal(live.predict(live.expired_key), 401, "key_expired")
    assert error["key_id"] == live.expired_key.split(".")[2] and "keys create keys" in error["message"]
    watcher, watcher_id = live.key(scopes=["metrics"])
    error = _refusal(live.predict(watcher), 403, "missing_scope")
    assert error["key_id"] == watcher_id and "needs predict" in error["message"]
    contract = requests.get(f"{live.base}/v1/contract", headers={"Authorization": f"Bearer {watcher}"}, timeout=10)
    assert contract.status_code == 200 and contract.json()["row_shape"] == [64]
    _refusal(requests.get(f"{live.base}/v1/contract", timeout=10), 401, "unauthorized")
    other, _ = live.key(app="another-app")
    _refusal(live.predict(other), 403, "forbidden")
    _refusal(live.predict(None), 401, "unauthorized")


def test_quota_exceeded_gives_429_with_retry_after(live):
    from mlplatform.serve import Quota

    key, key_id = live.key(quota=Quota.of(1, burst=2))
    codes = []
    for _ in range(12):
        r = live.predict(key)
        codes.append(r.status_code)
        if r.status_code == 429:
            error = _refusal(r, 429, "quota_exceeded")
            assert error["key_id"] == key_id and int(r.headers["Retry-After"]) >= 1
    assert codes[0] == 200 and codes.count(429) >= 6, codes
    assert set(codes) <= {200, 429}
    deadline = time.time() + 10  # a client that waits gets through again
    while live.predict(key).status_code != 200:
        assert time.time() < deadline
        time.sleep(0.5)


def test_keys_in_query_strings_and_oversized_requests_are_refused_not_5xx(live):
    key, _ = live.key()
    for url in (f"{live.base}/v1/predict?api_key={key}", f"{live.base}/v1/predict?key={key}"):
        r = requests.post(url, json=live.body, timeout=10)
        error = _refusal(r, 400, "key_in_query")
        assert "Authorization header" in error["message"] and key not in r.text
    _refusal(requests.get(f"{live.base}/healthz?token=x", timeout=10), 400, "key_in_query")
    r = live.predict(key, headers={"X-Pad": "a" * 20_000})
    assert r.status_code == 431, (r.status_code, r.text[:200])
    r = requests.post(f"{live.base}/v1/predict", data=b"[" * (2 << 20), timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 413, (r.status_code, r.text[:200])


def test_revocation_is_honoured_by_every_ingress_replica_within_5_s(live):
    from ray import serve

    from mlplatform.serve import revoke_key

    states = serve.status().applications[APP].deployments["ingress"].replica_states
    assert sum(n for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING") == 2
    key, key_id = live.key()
    # Each request lands on one of the two replicas at random: 20 successes mean both hold the
    # key in their cache (the chance that one never saw it is 2**-19).
    assert [live.predict(key).status_code for _ in range(20)] == [200] * 20
    revoke_key(APP, key_id, keys_dir=live.keys_dir)
    start = time.monotonic()
    while [live.predict(key).status_code for _ in range(10)] != [401] * 10:
        assert time.monotonic() - start < 5, "a replica still accepts the revoked key after 5 s"
    took = time.monotonic() - start
    assert [live.predict(key).status_code for _ in range(20)] == [401] * 20, "some replica still accepts it"
    assert took < 5
    _refusal(live.predict(key), 401, "key_revoked")
