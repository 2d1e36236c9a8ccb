"""The Prometheus scrape config: every node's Ray metrics agent, found through Ray's discovery file.

Ray's head keeps `<session dir>/prom_metrics_service_discovery.json` current with the
metrics-agent address of every live node (ray/_private/metrics_agent.py), in Prometheus'
file_sd format: Prometheus re-reads it, so nodes that join or leave (autoscaling) are
followed without a restart. cluster_configs/observability/prometheus.yml is `render()` for
Ray's default temp dir; `config(...)` makes one for any cluster (the live test's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DISCOVERY = "prom_metrics_service_discovery.json"  # ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
# Ray's default temp dir (ray start, KubeRay head pods, the VM launcher).
DEFAULT_FILE = f"/tmp/ray/session_latest/{DISCOVERY}"
HEADER = """\
# Prometheus scraping every Ray node's metrics agent (platform metrics are ray_mlplatform_*).
# Rendered by mlplatform.observability.prometheus (a test fails when this file drifts).
#   prometheus --config.file=cluster_configs/observability/prometheus.yml
# A local `mlplatform cluster up` cluster keeps its discovery file under its own temp dir:
#   /tmp/mlp-<cluster>-<hash>/head/session_latest/prom_metrics_service_discovery.json
# Scrape interval: gauges of a finished process stay ~20 s in Ray's agent (two report
# intervals), so scrape at least every 10 s to see a short job's last values.
"""


def config(files: list[str], scrape_interval: str = "10s", loopback: bool = False) -> dict[str, Any]:
    """A Prometheus config scraping the Ray nodes listed in discovery `files`.

    `loopback`: scrape every target on 127.0.0.1 (a local cluster: every node is this machine
    and its agents listen on all interfaces, while the file names the machine's address).
    """
    job: dict[str, Any] = {"job_name": "ray", "file_sd_configs": [{"files": list(files), "refresh_interval": "5s"}]}
    if loopback:
        job["relabel_configs"] = [{"source_labels": ["__address__"], "regex": "[^:]+:(\\d+)",
                                   "target_label": "__address__", "replacement": "127.0.0.1:$1"}]
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "scrape_configs": [job]}


def dumps(body: dict[str, Any]) -> str:
    return yaml.safe_dump(body, sort_keys=False)


def render() -> str:
    """The shipped file's text."""
    return HEADER + dumps(config([DEFAULT_FILE]))


def write(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render())
    return path
