"""TLS on the session cluster (started by `cluster up`, TLS on by default): Ray lets in only
clients holding a certificate from the cluster's CA, and Serve answers HTTPS only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import certifi
import pytest
import requests

from serve_models import digits_data, register_digits, serve_on_free_port

pytestmark = pytest.mark.timeout(300)

# A refused client keeps retrying the handshake rather than exiting: give it this long, then read
# what it printed (Ray's own GCS connect timeout cut short so its first failure shows early).
_REFUSED_WITHIN_S = 12


def _run(command: list[str], env: dict[str, str], timeout_s: float) -> tuple[int | None, str]:
    """(exit code or None when still running at `timeout_s`, stdout+stderr) with exactly `env` for Ray's variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    try:
        done = subprocess.run(command, env={**base, **env, "RAY_gcs_rpc_server_connect_timeout_s": "3"},
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out
    return done.returncode, done.stdout + done.stderr


def _ray_status(env: dict[str, str], timeout_s: float = 60) -> tuple[int | None, str]:
    return _run([str(Path(sys.executable).with_name("ray")), "status"], env, timeout_s)


def test_cluster_env_carries_the_client_certificate(three_region_cluster):
    env = three_region_cluster.env()
    material = three_region_cluster.tls()
    assert material is not None, "the session cluster should run with TLS (the default)"
    assert env["RAY_USE_TLS"] == "1" and env["RAY_TLS_CA_CERT"] == str(material.ca_cert)
    assert env["RAY_TLS_SERVER_CERT"] == str(material.client_cert)
    assert oct(material.client_key.stat().st_mode & 0o777) == "0o600"


def test_ray_status_and_ray_init_work_with_the_cluster_env(three_region_cluster):
    code, out = _ray_status(three_region_cluster.env())
    assert code == 0 and "Active:" in out, out[-2000:]
    script = "import ray; ray.init(logging_level='ERROR'); print('NODES', len(ray.nodes()))"
    code, out = _run([sys.executable, "-c", script], three_region_cluster.env(), 120)
    assert code == 0 and "NODES" in out, out[-2000:]


@pytest.mark.slow  # each refused client is given _REFUSED_WITHIN_S to fail
def test_ray_refuses_a_client_without_the_certificate_or_with_another_clusters(three_region_cluster, tmp_path):
    from mlplatform.cluster import tls

    env = three_region_cluster.env()
    # The token alone (no certificate): the GCS never completes a handshake with it.
    token_only = {k: v for k, v in env.items() if k not in tls.TLS_ENV}
    code, out = _ray_status(token_only, _REFUSED_WITHIN_S)
    assert code != 0 and "Active:" not in out and "Failed to connect to GCS" in out, out[-2000:]
    script = "import ray; ray.init(logging_level='ERROR'); print('NODES', len(ray.nodes()))"
    code, out = _run([sys.executable, "-c", script], token_only, _REFUSED_WITHIN_S)
    assert code != 0 and "NODES" not in out, out[-2000:]

    # Another cluster's CA and client certificate: the handshake fails verification.
    other = tls.ensure(tmp_path / "other", "other", ["head"], ip=three_region_cluster.gcs_address.rsplit(":", 1)[0])
    code, out = _ray_status({**env, **other.client_env()}, _REFUSED_WITHIN_S)
    assert code != 0 and "Active:" not in out and "CERTIFICATE_VERIFY_FAILED" in out, out[-2000:]


@pytest.mark.slow  # its own app (~30 s); test_serve_app.py checks HTTPS-only on the shared one by default
def test_serve_answers_https_with_a_key_and_never_plain_http(three_region_cluster, tmp_path):
    import ray
    from ray import serve

    from mlplatform.serve import build_app, create_key, endpoint

    root, keys_dir = tmp_path / "registry", tmp_path / "keys"
    register_digits(root, tmp_path / "artifacts")
    port = serve_on_free_port(three_region_cluster)
    spec = {"name": "tls", "model": "digits@production", "registry_root": str(root),
            "auth": {"keys_dir": str(keys_dir)}, "ingress": {"colocate": True},
            "primary": {"replicas": 1, "num_cpus": 0.25, "label_selector": {"ray.io/node-group": "cpu"}}}
    try:
        serve.run(build_app(spec), name="tls", route_prefix="/tls")
        base = endpoint("tls", cluster=three_region_cluster.name)
        assert base == f"https://127.0.0.1:{port}/tls"
        key = create_key("tls", keys_dir=keys_dir).key
        body = {"inputs": digits_data()[0][:1].tolist()}
        ca = str(three_region_cluster.tls().ca_cert)
        r = requests.post(f"{base}/v1/predict", json=body, headers={"Authorization": f"Bearer {key}"},
                          timeout=30, verify=ca)
        assert r.status_code == 200, r.text
        # Plain HTTP on the same port never reaches the model: the TLS listener drops it.
        with pytest.raises(requests.ConnectionError):
            requests.post(f"http://127.0.0.1:{port}/tls/v1/predict", json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=10)
        # Nor does a client that does not trust the cluster's CA get an answer.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"{base}/healthz", timeout=10, verify=certifi.where())  # public roots only
    finally:
        serve.shutdown()
        ray.shutdown()
