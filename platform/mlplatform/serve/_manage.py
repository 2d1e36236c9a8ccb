"""deploy / status / delete of Serve config files on a cluster (what `mlplatform serve ...` calls)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mlplatform import access, config
from mlplatform.serve._spec import ServeConfigFile


def check_config(path: str | os.PathLike) -> ServeConfigFile:
    """Validate a serve_apps/*.yaml, every application's `args:` included (SpecError lists all problems)."""
    return config.load(path, ServeConfigFile)


def deploy(
    path: str | os.PathLike, *, cluster: str | None = None, address: str | None = None,
    working_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Validate a Serve config file, then submit it as `serve deploy` does; returns the app names.

    The applications build on the cluster (model fetch, placement check) after this returns;
    follow them with `status()`.

    Args:
        working_dir: a local directory uploaded through the dashboard (as `ray job submit
            --working-dir` uploads one) and set as the runtime_env working_dir of every application
            that names none, so replicas import the user's model module (`mymod:make_model`) from it.
            Ray's own `serve deploy` accepts only remote URIs there.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    spec = check_config(path)
    for application in spec.applications:  # every app in the file, before any is submitted
        access.require("serve.deploy", f"serve:{application.name}")
    raw = yaml.safe_load(Path(path).read_text())
    client = ServeSubmissionClient(address or _dashboard(cluster))
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            from mlplatform.errors import SpecError

            raise SpecError(f"Got {str(working_dir)!r} for `--working-dir`; it is not a directory. "
                            "Pass the folder that holds your model module, e.g. `--working-dir .`.")
        shipped = {"working_dir": str(Path(working_dir).resolve())}
        client._upload_working_dir_if_needed(shipped)  # noqa: SLF001 - the upload `ray job submit` uses
        for app in raw.get("applications") or []:
            env = app.setdefault("runtime_env", {}) or {}
            env.setdefault("working_dir", shipped["working_dir"])
            app["runtime_env"] = env
    dashboard = address or _dashboard(cluster)
    https = _https_options(dashboard)
    if https and not (raw.get("http_options") or {}).get("ssl_certfile"):
        # Serve fixes http_options when it starts: the cluster's certificate from the first
        # deploy on, so its proxy never answers plain HTTP.
        raw["http_options"] = {**(raw.get("http_options") or {}), **https}
    client.deploy_applications(raw)
    return [a.name for a in spec.applications]


def status(*, cluster: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Per application: status, message and per-deployment status, replica counts, and for model
    deployments the variant served and why (`variant: auto`: the measured rows/s it chose by)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(address or _dashboard(cluster)).get_serve_details()
    out = {}
    for name, app in (details.get("applications") or {}).items():
        out[name] = {
            "status": app.get("status"), "message": app.get("message", ""), "route_prefix": app.get("route_prefix"),
            "deployments": {
                d: {"status": info.get("status"), "replicas": len(info.get("replicas") or []), **_variant(info)}
                for d, info in (app.get("deployments") or {}).items()
            },
        }
    return out


def _variant(info: dict[str, Any]) -> dict[str, Any]:
    """The variant a model deployment (or a colocated ingress) runs and why: the app builder puts
    them in the deployment's user_config (serve/_app.py `_resolve_auto`)."""
    cfg = (info.get("deployment_config") or {}).get("user_config") or {}
    if not isinstance(cfg, dict) or "variant" not in cfg:
        return {}
    return {k: cfg[k] for k in ("variant", "variant_reason", "ort_options") if k in cfg}


def delete(app: str, *, cluster: str | None = None) -> None:
    """Delete one Serve application (its replicas stop; other applications stay)."""
    access.require("serve.delete", f"serve:{app}")
    import ray
    from ray import serve

    from mlplatform.cluster import connect

    if not ray.is_initialized():
        connect(cluster)
    serve.delete(app)


def _https_options(dashboard: str) -> dict[str, str]:
    """Serve's HTTPS options for the local cluster behind `dashboard`, if it runs with TLS; else {}."""
    from mlplatform.cluster import local, tls

    for running in local.running():
        if running.dashboard_url == dashboard.rstrip("/") and running.tls() is not None:
            return tls.serve_http_options(running.tls())
    return {}


def _dashboard(cluster: str | None) -> str:
    if os.environ.get("RAY_DASHBOARD_ADDRESS") and cluster is None:
        return os.environ["RAY_DASHBOARD_ADDRESS"]
    from mlplatform.cluster.connect import authenticate

    return authenticate(cluster).dashboard_url
