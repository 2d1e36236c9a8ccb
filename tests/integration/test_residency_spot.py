"""Spot recovery stays home: a restricted run whose spot node is drained and reclaimed mid-run
restarts its workers only on nodes inside its regions, though a node outside has room.

Its own cluster (the session's is shared and a reclaimed node cannot come back): head and two
UAE spot nodes, and an EU node with free CPUs that `internal` work could use but `uae-restricted`
work must not. Where every worker ran, before and after, is read from Ray's state API.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO, local_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
REGION = "ray.io/availability-region"


@pytest.fixture(scope="module")
def spot_cluster(tmp_path_factory):
    node = {"memory_gb": 3, "region": "me-central-1", "zone": "me-central-1a"}
    body = {
        "name": f"spot-{uuid.uuid4().hex[:6]}",
        "head": {"name": "head", "cpus": 1, "market": "on-demand", **node},
        "worker_groups": [
            {"name": "spot-a", "count": 1, "cpus": 2, "market": "spot", **node},
            {"name": "spot-b", "count": 1, "cpus": 2, "market": "spot", **node},
            {"name": "eu", "count": 1, "cpus": 2, "memory_gb": 3, "region": "eu-central-1", "zone": "eu-central-1a",
             "market": "on-demand"},
        ],
        "residency_policy": str(REPO / "cluster_configs/residency/uae.yaml"),
    }
    path = tmp_path_factory.mktemp("spot") / "spot.yaml"
    path.write_text(yaml.safe_dump(body))
    with local_cluster(path) as running:
        yield running


def test_a_reclaimed_spot_node_restarts_restricted_workers_only_inside_the_uae(spot_cluster):
    import ray
    from ray.util.state import list_actors

    from mlplatform import config
    from mlplatform.cluster import connect, inventory
    from mlplatform.residency import audit
    from mlplatform.train import TrainSpec, train

    storage = Path(f"/tmp/mlplatform/tests-{uuid.uuid4().hex[:8]}")  # inside uae-restricted's prefixes
    spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
    spec = spec.model_copy(update={
        "name": "digits-spot", "storage_path": str(storage), "max_failures": 3, "resources_per_worker": {"CPU": 1},
        "epochs": 4,
        "placement": spec.placement.model_copy(update={"label_selector": {}, "allow_spot": True}),
        "checkpoint": spec.checkpoint.model_copy(update={"every_n_steps": 20}),
    })
    nodes = {n.node_id: n for n in inventory(spot_cluster.name)}
    steps_log = storage / spec.name / "steps.log"
    connect(spot_cluster.name)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(spec)))
    try:
        runner.start()
        deadline = time.monotonic() + 300
        while runner.is_alive() and time.monotonic() < deadline and not (
                steps_log.exists() and len(steps_log.read_text().splitlines()) >= 44):
            time.sleep(0.05)
        first = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
        assert len(first) == 2, first
        hosts = {nodes[a.node_id].group for a in first}
        assert hosts <= {"spot-a", "spot-b"}
        # The spot node is reclaimed: told first (a drain, as the cloud's notice), then gone.
        victim = next(a.node_id for a in first)
        drained = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node", "--address", spot_cluster.gcs_address,
             "--node-id", victim, "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaimed",
             "--deadline-remaining-seconds", "5"],
            env={**os.environ, **spot_cluster.env()}, capture_output=True, text=True, timeout=60)
        assert drained.returncode == 0, drained.stderr
        process = next(p for p in spot_cluster.nodes if p.group == nodes[victim].group)
        os.killpg(process.pid, signal.SIGKILL)
        runner.join(600)
        result = outcome["result"]
        assert 0 < result.resumed_from_step < result.steps == 4 * 22

        job_id = ray.get_runtime_context().get_job_id()
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", job_id)], detail=True)
    finally:
        runner.join(600)
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)
    # Every worker of every attempt ran in the UAE; the second attempt's away from the reclaimed node.
    assert len(workers) == 4
    assert {nodes[a.node_id].region for a in workers} == {"me-central-1"}
    restarted = [a for a in workers if a.actor_id not in {w.actor_id for w in first}]
    assert len(restarted) == 2 and victim not in {a.node_id for a in restarted}
    ran = [r for r in audit.read(audit.default_path(spot_cluster.name), "ran") if r["job_id"] == job_id]
    assert ran[-1]["regions"] == ["me-central-1"] and ran[-1]["outside"] == 0
