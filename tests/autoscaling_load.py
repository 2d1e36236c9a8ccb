"""A Serve app pinned to one node group, a load step against it, and what Ray reports meanwhile.

Shared by the autoscaling integration test and its benchmark: both read replicas and nodes
from Ray (Serve's status, the state API's nodes), never from the load generator.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

APP = "autoscale-probe"


def deploy_pinned_app(group: str, port: int, *, max_replicas: int = 4, work_s: float = 0.5) -> str:
    """Deploy a Serve app whose replicas (1 CPU each) may only run on `group`; returns its URL."""
    from ray import serve

    @serve.deployment(
        ray_actor_options={"num_cpus": 1, "label_selector": {"ray.io/node-group": group}},
        autoscaling_config={
            "min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 1,
            "upscale_delay_s": 2, "downscale_delay_s": 10, "metrics_interval_s": 1, "look_back_period_s": 3,
        },
        max_ongoing_requests=2,
    )
    class Probe:
        def __call__(self, request) -> str:
            time.sleep(work_s)  # a model's forward pass, holding the replica
            return "ok"

    # Proxy on the head only: a proxy on a launched node would be one more actor there.
    serve.start(http_options={"host": "127.0.0.1", "port": port, **_https_options()}, proxy_location="HeadOnly")
    serve.run(Probe.bind(), name=APP, route_prefix=f"/{APP}")
    return f"{'https' if _https_options() else 'http'}://127.0.0.1:{port}/{APP}"


def _https_options() -> dict[str, str]:
    """The connected cluster's Serve HTTPS options (connect() exported its TLS client settings); {} without TLS."""
    import os
    from pathlib import Path

    from mlplatform.cluster import tls

    if os.environ.get("RAY_USE_TLS") != "1":
        return {}
    return tls.serve_http_options(tls.Material(Path(os.environ["RAY_TLS_CA_CERT"]).parent))


def _context(url: str):
    """Verify an https:// URL against the cluster's CA."""
    from mlplatform.serve._client import https_context

    return https_context() if url.startswith("https://") else None


@dataclass
class Sample:
    t: float
    replicas: int
    nodes: int


@dataclass
class Timeline:
    """Running replicas of the app and alive nodes of the group, sampled from Ray."""

    group: str
    samples: list[Sample] = field(default_factory=list)

    def peak(self) -> Sample:
        return max(self.samples, key=lambda s: (s.replicas, s.nodes))

    def last(self) -> Sample:
        return self.samples[-1]


def alive_nodes(group: str) -> list[dict]:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(detail=True, limit=1000)
            if n.state == "ALIVE" and (n.labels or {}).get("ray.io/node-group") == group]


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def sample_into(timeline: Timeline, stop: threading.Event, start: float, every_s: float = 1.0) -> None:
    while not stop.is_set():
        timeline.samples.append(Sample(time.monotonic() - start, running_replicas(), len(alive_nodes(timeline.group))))
        stop.wait(every_s)


def load_step(url: str, seconds: float, concurrency: int) -> int:
    """`concurrency` clients each sending requests back to back for `seconds`; returns the count of 200s."""
    deadline = time.monotonic() + seconds
    ok = 0
    lock = threading.Lock()

    def client() -> None:
        nonlocal ok
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=60, context=_context(url)) as response:
                    if response.status == 200:
                        with lock:
                            ok += 1
            except OSError:
                time.sleep(0.2)

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    return ok


def wait_until(predicate, timeout_s: float, every_s: float = 1.0) -> float:
    """Seconds until `predicate()` held; raises TimeoutError after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"not within {timeout_s:.0f}s")
        time.sleep(every_s)
    return time.monotonic() - start
