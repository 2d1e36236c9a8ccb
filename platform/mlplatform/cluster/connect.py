"""Connect a process to a cluster with its token, so users never handle Ray's auth by hand."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlplatform.cluster import local, tls
from mlplatform.residency import CLUSTER_ENV, guard


def cluster_env(name: str | None = None) -> dict[str, str]:
    """The variables that point Ray's CLI, job API and `ray.init()` at local cluster `name`."""
    return local.find(name).env()


def authenticate(name: str | None = None) -> local.LocalCluster:
    """Point this process's Ray clients (job and Serve SDKs, `ray.init`) at local cluster `name`, token included."""
    cluster = local.find(name)
    if cluster.tls() is not None:
        # An expired client certificate would fail deep in gRPC; say which file and how to renew.
        tls.check(cluster.tls(), cluster.name)
    env = cluster.env()
    for var in tls.TLS_ENV:  # a cluster without TLS: drop another cluster's certificates from this process
        if var not in env:
            os.environ.pop(var, None)
    os.environ.update(env)
    _reload_ray_auth_settings()
    return cluster


def connect(name: str | None = None, **ray_init_kwargs: Any) -> Any:
    """`ray.init()` against a cluster, token authentication included.

    Which cluster: the local cluster `name` if given; otherwise the cluster named by
    RAY_ADDRESS (set inside a Ray job, or exported for KubeRay / VM clusters);
    otherwise the only running local cluster. Returns what `ray.init` returns.

    Raises:
        ClusterNotRunning: no cluster matches.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if name is None and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        if "RAY_AUTH_MODE" not in os.environ and _token_available():
            os.environ["RAY_AUTH_MODE"] = "token"
        _reload_ray_auth_settings()
    else:
        cluster = authenticate(name)
        address = cluster.gcs_address
        os.environ[CLUSTER_ENV] = cluster.name  # which trail this driver's audit records go to
        # Every worker of the platform's clusters runs the residency guard (its nodes' environment):
        # a runtime_env may not replace it (as RAY_RUNTIME_ENV_HOOK refuses for drivers on a node).
        guard.runtime_env_hook(ray_init_kwargs.get("runtime_env"))
    ray_init_kwargs.setdefault("logging_level", "WARNING")
    return ray.init(address=address, **ray_init_kwargs)


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _reload_ray_auth_settings() -> None:
    # Ray reads RAY_AUTH_MODE and the token once per process and caches both; after
    # changing the environment this process must re-read them (Ray's own
    # `_enable_token_auth` does the same). Config.initialize also re-reads RAY_USE_TLS for the
    # C++ side; Python's gRPC channels read RAY_USE_TLS and the cert paths at each connection.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
