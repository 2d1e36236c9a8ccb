"""`make demo`: the platform end to end on a local multi-region cluster.

Brings the cluster up (unless it already runs), runs each stage through the same
interfaces a user has (`ray job submit` via the job API, the CLI's library calls),
prints a report and the dashboard URL, and stops what it started.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mlplatform import cluster, config
from mlplatform.cli import _print_nodes, table
from mlplatform.errors import PlatformError

REPO = Path(__file__).resolve().parents[2]


# Where the demo registers models; serve_apps/digits-*.yaml load `digits@production` from here.
REGISTRY = "/tmp/mlplatform/registry"
MODEL = "digits"
SERVE_APP = "serve_apps/digits-cpu.yaml"


def _job(entrypoint: str, name: str, tail: int = 25) -> str:
    from mlplatform.cluster.jobs import submit_job

    result = submit_job(entrypoint, str(REPO), name=name)
    if tail or not result.succeeded:
        print("\n".join(result.logs.rstrip().splitlines()[-(tail or 40):]))
    if not result.succeeded:
        raise PlatformError(f"job {result.job_id} ({entrypoint}) ended {result.status}; its logs are above.")
    return result.logs


def _stage_hello(name: str, state: dict) -> str:
    logs = _job("python jobs/hello.py", name, tail=6)
    return f"{logs.count('task for group')} node groups answered"


def _stage_train(name: str, state: dict) -> str:
    from mlplatform.train import read_metadata

    # A run name of its own each time: the shipped name would resume its last checkpoint and
    # train nothing on a second `make demo`.
    run = f"digits-demo-{time.strftime('%Y%m%d-%H%M%S')}"
    logs = _job(f"python jobs/train.py --config jobs/configs/digits.yaml --name {run}", name, tail=0)
    # Ray Data's progress lines interleave with the job's own; show the run's summary.
    summary = [line for line in logs.splitlines() if line.startswith(run) or line.strip().startswith(("artifact ", "checkpoint "))]
    print("\n".join(summary))
    state["artifact"] = next(line.split()[-1] for line in summary if line.strip().startswith("artifact "))
    meta = read_metadata(state["artifact"])
    training, engine = meta["training"], meta["training"]["engine"]
    if training["resumed_from_step"] or not training["steps"]:
        raise PlatformError(f"{run} trained {training['steps']} steps, resumed from {training['resumed_from_step']}: "
                            "the demo must train from scratch")
    return (
        f"{training['steps']} steps from scratch, ZeRO-{training['zero_stage']} {training['precision']} on "
        f"{len(engine)} CPU workers ({engine[0]['optimizer']}, as the DeepSpeed engines report); "
        f"val_accuracy {meta['metrics']['val_accuracy']:.4f}"
    )


def _stage_register(name: str, state: dict) -> str:
    from mlplatform import registry

    version = registry.register(state["artifact"], MODEL, root=REGISTRY)
    state["trained"] = version.ref
    print(f"registered {version.ref}: {len(version.files)} files, sha256 of each recorded, under {REGISTRY}")
    return version.ref


def _stage_export(name: str, state: dict) -> str:
    from mlplatform import registry

    _job(
        f"python jobs/export.py --model {state['trained']} --config jobs/configs/export-digits.yaml --root {REGISTRY}",
        name, tail=30,
    )
    exported = registry.resolve(f"{MODEL}@latest", root=REGISTRY)
    move = registry.set_alias(MODEL, "production", exported.version, root=REGISTRY, reason="demo: export gates passed")
    report = registry.verify(exported.ref, root=REGISTRY)
    print(f"{move.alias} -> {exported.ref}; integrity: {report.files_checked} files verified")
    return f"{exported.ref} (ONNX FP32 + INT8, gated) is {MODEL}@production"


def _stage_serve(name: str, state: dict) -> str:
    import ray
    import yaml
    from ray.util.state import list_actors

    from mlplatform import cluster, serve
    from mlplatform.serve._traffic import send
    from sklearn.datasets import load_digits

    config = yaml.safe_load((REPO / SERVE_APP).read_text())
    app = config["applications"][0]["name"]
    url = f"http://{config['http_options']['host']}:{config['http_options']['port']}/v1/predict"
    serve.deploy(REPO / SERVE_APP, cluster=name)
    _wait_running(app, name)
    key = serve.create_key(app, label="make demo").key
    rows = (load_digits().data[:200] / 16.0).tolist()  # the same 0..1 scaling training used
    stats = send(url, key, rows, requests=600, concurrency=16)
    print(stats.summary())
    cluster.connect(name)
    groups = {n.node_id: n.group for n in cluster.inventory()}
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True) if a.class_name.startswith(f"ServeReplica:{app}")]
    placement = Counter(f"{a.class_name.split(':')[-1]}@{groups.get(a.node_id, '?')}" for a in replicas)
    print("replica placement (deployment@node group):", dict(placement))
    serve.delete(app, cluster=name)
    ray.shutdown()
    if set(stats.codes) != {200}:
        raise PlatformError(f"serving returned {stats.codes}; expected only 200s.")
    return f"p50 {stats.percentile(50):.1f} ms, p99 {stats.percentile(99):.1f} ms, {stats.throughput:.0f} req/s, max batch {max(stats.batch_rows)}"


def _wait_running(app: str, name: str, timeout_s: float = 300.0) -> None:
    from mlplatform import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status(cluster=name).get(app, {})
        if status.get("status") == "RUNNING":
            return
        if status.get("status") == "DEPLOY_FAILED":
            raise PlatformError(f"{app} failed to deploy: {status.get('message')}")
        time.sleep(2)
    raise PlatformError(f"{app} was not RUNNING within {timeout_s:.0f}s; see `mlplatform serve status`.")


STAGES: list[tuple[str, Callable[[str, dict], str]]] = [
    ("hello job (ray job submit: one task per node group)", _stage_hello),
    ("train digits (ray job submit jobs/train.py, DeepSpeed ZeRO-2)", _stage_train),
    ("register the artifact (versioned, hashed)", _stage_register),
    ("export ONNX + INT8 with accuracy gates (ray job submit jobs/export.py)", _stage_export),
    (f"serve {SERVE_APP} (keys, batching, autoscaling) and send traffic", _stage_serve),
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
    report, state = [], {}
    try:
        print("\n==> Inventory")
        _print_nodes(cluster.inventory(spec.name))
        for title, stage in STAGES:
            print(f"\n==> {title}", flush=True)
            t0 = time.monotonic()
            outcome = stage(spec.name, state)
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
