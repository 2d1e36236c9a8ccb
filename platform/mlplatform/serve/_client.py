"""Calling a served application from Python: its URL, timed requests, a latency histogram.

What a notebook or a smoke check does after deploying; the HTTP contract is the ingress's
(POST <route>/v1/predict with `Authorization: Bearer <key>`).
"""

from __future__ import annotations

import json
import os
import ssl
import statistics
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def endpoint(app: str, *, cluster: str | None = None) -> str:
    """The base URL of application `app` (Serve's proxy host and port, plus its route prefix):
    https:// when Serve runs with a certificate (every cluster with TLS on).

    Raises:
        ServeError: `app` is not deployed on the cluster.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from mlplatform.errors import ServeError
    from mlplatform.serve._manage import _dashboard

    details = ServeSubmissionClient(_dashboard(cluster)).get_serve_details()
    apps = details.get("applications") or {}
    if app not in apps:
        raise ServeError(f"Got {app!r} for the application; deployed are {', '.join(apps) or 'none'}. "
                         "Deploy it first (`mlplatform serve deploy` or serve.run).")
    http = details.get("http_options") or {}
    host = http.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    prefix = (apps[app].get("route_prefix") or "/").rstrip("/")
    scheme = "https" if http.get("ssl_certfile") else "http"
    return f"{scheme}://{host}:{http.get('port', 8000)}{prefix}"


@dataclass
class Latencies:
    """What `timed_predictions` measured: each request's outputs and wall time."""

    outputs: list[list[float]] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.ms, n=100, method="inclusive")[q - 1]

    def summary(self) -> str:
        return (f"{len(self.ms)} requests: p50 {self.percentile(50):.1f} ms, p90 {self.percentile(90):.1f} ms, "
                f"p99 {self.percentile(99):.1f} ms, max {max(self.ms):.1f} ms")


def timed_predictions(url: str, key: str, rows: Sequence[Sequence[float]], timeout_s: float = 30.0,
                      ca: str | None = None) -> Latencies:
    """POST each row of `rows` to `url`/v1/predict, one request at a time, timing each.

    Args:
        ca: the CA file an https:// `url` is verified against; default RAY_TLS_CA_CERT (the
            cluster's CA, from `mlplatform cluster env` or `connect`).
    """
    context = https_context(ca) if url.startswith("https://") else None
    out = Latencies()
    for row in rows:
        request = urllib.request.Request(
            f"{url}/v1/predict", data=json.dumps({"inputs": [list(map(float, row))]}).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            body: dict[str, Any] = json.loads(response.read())
        out.ms.append((time.perf_counter() - t0) * 1000)
        out.outputs.append(body["outputs"][0])
    return out


def https_context(ca: str | None = None) -> ssl.SSLContext:
    """An SSL context that trusts the cluster's CA (`ca`, default RAY_TLS_CA_CERT) and verifies host names."""
    from mlplatform.errors import ServeError

    ca = ca or os.environ.get("RAY_TLS_CA_CERT")
    if not ca:
        raise ServeError("An https:// Serve URL needs the cluster's CA: run `eval \"$(mlplatform cluster env)\"` "
                         "(sets RAY_TLS_CA_CERT) or pass `ca=`.")
    return ssl.create_default_context(cafile=ca)


def latency_histogram(latencies: Latencies, title: str = "request latency"):
    """A matplotlib Figure: the histogram of request latencies with p50 and p99 marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.hist(latencies.ms, bins=40, color="tab:blue", alpha=0.8)
    for q, style in ((50, "--"), (99, ":")):
        ax.axvline(latencies.percentile(q), color="black", linestyle=style, label=f"p{q} {latencies.percentile(q):.1f} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.set_title(f"{title} ({len(latencies.ms)} requests)")
    ax.legend()
    fig.tight_layout()
    return fig
