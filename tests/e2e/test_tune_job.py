"""Issue 13's "done when" through `ray job submit`: a cost-aware search on the three-region
cluster finishes with a best config, a Pareto table and a PNG, its trials' workers on spot
nodes (Ray's state API), and a ledger whose figures are Ray's records × the catalog's prices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.timeout(900)


def tune_spec(folder: Path, **changes) -> Path:
    """jobs/configs/tune-digits.yaml made small: `changes` replace top-level keys."""
    body = yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())
    body.update({"train": str(REPO / "jobs/configs/digits.yaml"), "storage_path": str(folder), **changes})
    body["overrides"] = {**body["overrides"], "epochs": 2}
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def mlplatform(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlplatform", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **cluster.env(), "MLPLATFORM_CLUSTER": cluster.name})


def test_a_search_runs_on_spot_and_its_ledger_is_rays_records_times_the_catalog(three_region_cluster, restricted_tmp):
    import ray
    from ray._private import state
    from ray.util.state import list_actors, list_nodes

    from mlplatform import registry
    from mlplatform.cluster import connect
    from mlplatform.cost import catalog

    name = f"tune-{uuid.uuid4().hex[:6]}"
    spec = tune_spec(restricted_tmp, name=name, num_samples=2, searcher={"name": "random", "seed": 0},
                     objective={"kind": "max_metric"}, register={"name": name, "root": str(restricted_tmp / "registry")})
    planned = mlplatform(three_region_cluster, "tune", "plan", "--config", str(spec))
    assert planned.returncode == 0, planned.stderr
    assert "forecast" in planned.stdout and "spot then on-demand" in planned.stdout

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    submitted = subprocess.run(
        [ray_cli, "job", "submit", "--working-dir", ".", "--", "python", "jobs/tune.py", "--config", str(spec)],
        cwd=REPO, env={**os.environ, **three_region_cluster.env()}, capture_output=True, text=True, timeout=800,
    )
    assert submitted.returncode == 0 and "succeeded" in submitted.stdout, (submitted.stdout + submitted.stderr)[-4000:]

    results = restricted_tmp / name / "results"
    best = json.loads((results / "best.json").read_text())
    trials = json.loads((results / "trials.json").read_text())
    assert len(trials) == 2 and best["trial"]["trial"] in {t["trial"] for t in trials}
    assert "| trial | config | val_accuracy |" in (results / "pareto.md").read_text()
    assert (results / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    job_id = best["cost"]["job_id"]

    # The winner is registered with its search and what it cost in the lineage.
    version = registry.show(name, root=restricted_tmp / "registry")
    tuning = version.lineage.extra["tuning"]
    assert tuning["trial"] == best["trial"]["trial"] and tuning["search_cost"] > 0

    report = mlplatform(three_region_cluster, "cost", "report", "--job", job_id, "--by", "trial", "--json")
    assert report.returncode == 0, report.stderr
    rows = {r["key"]: r for r in json.loads(report.stdout)["rows"]}
    assert {t["trial"] for t in trials} <= set(rows)
    for t in trials:
        assert rows[t["trial"]]["cost"] > 0 and rows[t["trial"]]["regions"] == ["me-central-1"]
        assert "spot" in rows[t["trial"]]["markets"]

    connect(three_region_cluster.name)
    try:
        # Every trial's Train workers ran on spot nodes: read from Ray, not from the platform.
        nodes = {n.node_id: n for n in list_nodes(detail=True)}
        ray_job = job_id.split("@")[0]  # the ledger keys jobs by Ray's id and the cluster's session
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job)], detail=True)
        assert len(workers) >= 2
        assert {nodes[w.node_id].labels["ray.io/market-type"] for w in workers} == {"spot"}
        # Ledger = Ray's record of each worker's life × its share of the node × the catalog's price.
        prices = catalog.current()
        gcs = state.actors()
        from mlplatform.cost import open_ledger

        ledger = {u.item_id: u for u in open_ledger().usages(job_id=job_id)}
        for w in workers:
            life = gcs[w.actor_id]
            seconds = (life["EndTime"] - life["StartTime"]) / 1000
            node = nodes[w.node_id]
            price = prices.price(node.labels["ray.io/availability-region"], node.labels["ray.io/node-group"], "spot")
            expected = seconds * 1.0 / node.resources_total["CPU"] * price / 3600
            assert ledger[w.actor_id].cost == pytest.approx(expected, rel=0.01)
        total = json.loads(mlplatform(three_region_cluster, "cost", "report", "--job", job_id, "--json").stdout)
        assert total["total"]["cost"] == pytest.approx(sum(u.cost for u in ledger.values()), rel=0.01)
    finally:
        ray.shutdown()


@pytest.mark.parametrize("changes, field, why", [
    ({"budget": {"amount": 1e-9}}, "budget.amount", "below one trial's forecast"),
    ({"market": {"prefer": "spot", "fallback": "none"},
      "overrides": {"placement": {"allow_spot": True, "label_selector": {"ray.io/node-group": "cpu"}}}},
     "market", "no live node"),
    ({"metric": "val_rmse"}, "metric", "never reports"),
    ({"search_space": {"optimizer.lr": {"uniform": [0.1, 0.01]}}}, "search_space.optimizer.lr", ""),
    ({"budget": {"amount": 1.0, "currency": "EUR"}}, "budget.currency", "USD"),
])
def test_tune_plan_refuses_bad_input_naming_the_field(three_region_cluster, restricted_tmp, changes, field, why):
    body = yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())
    if "overrides" in changes:
        changes = {**changes, "overrides": {**body["overrides"], **changes["overrides"]}}
    spec = tune_spec(restricted_tmp, **changes)
    planned = mlplatform(three_region_cluster, "tune", "plan", "--config", str(spec))
    assert planned.returncode != 0 and "Traceback" not in planned.stderr, planned.stderr
    assert f"`{field}`" in planned.stderr or field in planned.stderr, planned.stderr
    assert why in planned.stderr
