"""Tuning trials on spot nodes through a preemption notice, a hard kill and a money budget.

Its own cluster (the session's is shared, and a preempted node does not come back): a head,
an on-demand `cpu` node and one `spot` node in the UAE (and an EU node), priced by a catalog of its own. The
notice is Ray's node drain with reason PREEMPTION and a deadline, as a cloud's spot notice
reaches KubeRay; at the deadline Ray takes the node down.
"""

from __future__ import annotations

import json
import os
import re
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def spot_cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tune-spot")
    node = {"memory_gb": 3, "region": "me-central-1", "zone": "me-central-1a"}
    prices = {
        "name": "test", "currency": "USD", "source": "test figures", "as_of": "2026-11-01", "example": True,
        "prices": [
            {"region": "me-central-1", "node_group": "head", "market": "on-demand", "per_hour": 0.10},
            {"region": "me-central-1", "node_group": "cpu", "market": "on-demand", "per_hour": 0.30},
            {"region": "me-central-1", "node_group": "spot", "market": "spot", "per_hour": 0.06,
             "preemption_rate_per_hour": 0.1},
            {"region": "eu-central-1", "node_group": "eu", "market": "on-demand", "per_hour": 0.05},
        ],
    }
    (folder / "prices.yaml").write_text(yaml.safe_dump(prices))
    body = {
        "name": f"tune-spot-{uuid.uuid4().hex[:6]}",
        "head": {"name": "head", "cpus": 1, "market": "on-demand", **node},
        "worker_groups": [
            {"name": "cpu", "count": 1, "cpus": 3, "market": "on-demand", **node},
            {"name": "spot", "count": 1, "cpus": 2, "market": "spot", **node},
            # The policy's `internal` data may also go to the EU: a node there, which restricted trials never use.
            {"name": "eu", "count": 1, "cpus": 1, "memory_gb": 2, "region": "eu-central-1", "zone": "eu-central-1a",
             "market": "on-demand"},
        ],
        "residency_policy": str(REPO / "cluster_configs/residency/uae.yaml"),
        "price_catalog": "prices.yaml",
    }
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(body))
    with local_cluster(path) as running:
        yield running


def tune_spec(folder: Path, **changes) -> Path:
    body = yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())
    body.update({"train": str(REPO / "jobs/configs/digits.yaml"), "storage_path": str(folder),
                 "name": f"t-{uuid.uuid4().hex[:6]}", "searcher": {"name": "random", "seed": 0},
                 "scheduler": {"name": "none"}, "objective": {"kind": "max_metric"}, "budget": {}, **changes})
    path = folder / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def run_search(cluster, spec_path: Path, during=None) -> tuple[dict, str]:
    """jobs/tune.py through `ray job submit` (its best.json and output); `during()` runs alongside it."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, **cluster.env()}
    job = subprocess.Popen(
        [ray_cli, "job", "submit", "--working-dir", ".", "--", "python", "jobs/tune.py", "--config", str(spec_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout))
    reader.start()
    try:
        if during:
            during(lambda: job.poll() is None)
        job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
        reader.join(30)
    text = "".join(output)
    assert job.returncode == 0 and "succeeded" in text, text[-5000:]
    spec = yaml.safe_load(spec_path.read_text())
    return json.loads((Path(spec["storage_path"]) / spec["name"] / "results" / "best.json").read_text()), text


def wait_for_steps(runs: Path, steps: int, running, timeout_s: float = 400) -> Path:
    """The first trial run whose step log reaches `steps` steps, while `running()`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and running():
        for log in runs.glob("*/steps.log"):
            if len(log.read_text().splitlines()) >= steps:
                return log
        time.sleep(0.1)
    raise AssertionError(f"no trial under {runs} reached step {steps} while the search ran ({timeout_s} s at most)")


def test_a_preemption_notice_checkpoints_and_the_search_completes_on_demand(spot_cluster, restricted_tmp):
    import ray
    from ray.util.state import list_actors, list_nodes

    from mlplatform.cluster import connect

    spec = tune_spec(restricted_tmp, num_samples=1, max_concurrent_trials=1,
                     overrides={**yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())["overrides"],
                                "epochs": 40, "checkpoint": {"every_n_steps": 200}})
    name = yaml.safe_load(spec.read_text())["name"]
    runs = restricted_tmp / name / "runs"
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    spot = next(p for p in spot_cluster.nodes if p.group == "spot")
    drained: dict = {}

    def preempt(running) -> None:
        wait_for_steps(runs, 60, running)
        connect(spot_cluster.name)
        node = next(n for n in list_nodes(detail=True) if n.labels.get("ray.io/node-group") == "spot")
        drained["node"] = node.node_id
        out = subprocess.run(
            [ray_cli, "drain-node", "--address", spot_cluster.gcs_address, "--node-id", node.node_id,
             "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot notice",
             "--deadline-remaining-seconds", "15"],
            env={**os.environ, **spot_cluster.env()}, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    try:
        best, output = run_search(spot_cluster, spec, during=preempt)
        trial = best["trial"]
        assert trial["status"] == "DONE"
        # The notice's emergency checkpoint (off the 200-step cadence), and the run resumed from it.
        noticed = re.search(r"preemption notice at step (\d+): taking an emergency checkpoint", output)
        assert noticed, output[-3000:]
        at = int(noticed.group(1))
        assert at % 200 and f"resumed from the checkpoint of step {at}/" in output
        log = next(runs.glob("*/steps.log"))
        steps = [int(line.split()[0]) for line in log.read_text().splitlines()]
        assert len(steps) - len(set(steps)) <= 1 and best["cost"]["lost_steps"] <= 1
        assert sorted(set(steps)) == list(range(1, max(steps) + 1)) and max(steps) == trial["steps"]
        # Before the notice on spot; after it on the on-demand node (Ray's records).
        ray_job = best["cost"]["job_id"].split("@")[0]  # the ledger's key is Ray's id @ the cluster's session
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job)], detail=True)
        nodes = {n.node_id: n.labels for n in list_nodes(detail=True)}
        markets = [nodes[w.node_id]["ray.io/market-type"] for w in workers]
        assert "spot" in markets and "on-demand" in markets
        assert {nodes[w.node_id]["ray.io/availability-region"] for w in workers} == {"me-central-1"}
        assert "on-demand" in trial["market"] and "spot" in trial["market"]
    finally:
        ray.shutdown()
        if spot.alive():
            os.killpg(spot.pid, signal.SIGKILL)


def test_a_killed_trial_worker_resumes_from_its_last_checkpoint(spot_cluster, restricted_tmp):
    """After the spot node went (the test above), trials run on demand; a worker killed without
    notice costs at most one checkpoint interval of steps."""
    import psutil

    spec = tune_spec(restricted_tmp, num_samples=1, max_concurrent_trials=1,
                     market={"prefer": "spot", "fallback": "on-demand"},
                     overrides={**yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())["overrides"],
                                "epochs": 30, "checkpoint": {"every_n_steps": 50}})
    name = yaml.safe_load(spec.read_text())["name"]
    runs = restricted_tmp / name / "runs"
    killed: dict = {}

    def kill_worker(running) -> None:
        log = wait_for_steps(runs, 120, running)
        pid = int(log.read_text().splitlines()[-1].split()[1])  # rank 0's process, from the step log
        killed["at"] = len(log.read_text().splitlines())
        psutil.Process(pid).kill()

    best, _ = run_search(spot_cluster, spec, during=kill_worker)
    log = next(runs.glob("*/steps.log"))
    steps = [int(line.split()[0]) for line in log.read_text().splitlines()]
    redone = len(steps) - len(set(steps))
    assert 0 < redone <= 50, (killed, redone)
    assert best["cost"]["lost_steps"] == redone and best["cost"]["lost_cost"] > 0
    assert best["trial"]["status"] == "DONE"


# About three trials' worth on the on-demand node (0.30 USD/h for 3 CPUs, one CPU per trial).
BUDGET = 0.005


def test_spend_stays_within_the_budget_plus_one_step(spot_cluster, restricted_tmp):
    from mlplatform.cost import open_ledger

    overrides = {**yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())["overrides"], "epochs": 3}
    spec = tune_spec(restricted_tmp, num_samples=6, max_concurrent_trials=2, overrides=overrides,
                     market={"prefer": "spot", "fallback": "on-demand"}, budget={"amount": BUDGET})
    best, _ = run_search(spot_cluster, spec)
    trials = json.loads((Path(yaml.safe_load(spec.read_text())["storage_path"]) / yaml.safe_load(spec.read_text())["name"]
                         / "results" / "trials.json").read_text())
    reported = sum(t["reported_cost"] or 0 for t in trials)
    assert len(trials) < 6, "the budget should have stopped the search before every trial ran"
    # Each running trial may overshoot by one report's spend (an epoch here).
    per_step = max(t["reported_cost"] / max(1, t["steps"] or 1) * 44 for t in trials if t["reported_cost"])
    assert reported <= BUDGET + 2 * per_step
    assert open_ledger().jobs(job_id=best["cost"]["job_id"])
