"""`make demo`: the platform end to end on a local multi-region cluster.

Brings the cluster up (unless it already runs), runs each stage through the same
interfaces a user has (`ray job submit` via the job API, the CLI's library calls),
prints a report and the dashboard URL, and stops what it started.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mlplatform import cluster, config
from mlplatform.cli import _print_nodes, table
from mlplatform.errors import PlatformError

REPO = Path(__file__).resolve().parents[2]


def _stage_hello(name: str) -> str:
    from mlplatform.cluster.jobs import submit_job

    result = submit_job("python jobs/hello.py", str(REPO), name=name)
    print(result.logs.rstrip())
    if not result.succeeded:
        raise PlatformError(f"hello job {result.job_id} ended {result.status}; its logs are above.")
    return f"job {result.job_id} {result.status} in {result.seconds:.1f}s"


STAGES: list[tuple[str, Callable[[str], str]]] = [
    ("hello job (ray job submit: one task per node group)", _stage_hello),
]


def run(cluster_config: str) -> int:
    spec = config.load(cluster_config, cluster.ClusterSpec)
    started_here = spec.name not in {c.name for c in cluster.running()}
    if started_here:
        print(f"==> Starting cluster '{spec.name}' from {cluster_config}", flush=True)
        running = cluster.up(spec, cluster_config)
    else:
        print(f"==> Using the running cluster '{spec.name}' (it stays up afterwards)")
        running = cluster.find(spec.name)
    report = []
    try:
        print("\n==> Inventory")
        _print_nodes(cluster.inventory(spec.name))
        for title, stage in STAGES:
            print(f"\n==> {title}", flush=True)
            t0 = time.monotonic()
            outcome = stage(spec.name)
            report.append([title, outcome, f"{time.monotonic() - t0:.1f}s"])
        print("\n==> Report")
        print(table(["STAGE", "OUTCOME", "TIME"], report))
        print(f"\nDashboard: {running.dashboard_url}  (token: `mlplatform cluster token --name {spec.name}`)")
    finally:
        import ray

        ray.shutdown()
        if started_here:
            print(f"\n==> Stopping cluster '{spec.name}'", flush=True)
            cluster.down(spec.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlplatform.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", default="cluster_configs/local/three-region.yaml", help="Cluster spec YAML.")
    args = parser.parse_args(argv)
    try:
        return run(args.cluster)
    except PlatformError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
