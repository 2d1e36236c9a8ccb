"""`ray job submit --working-dir . -- python jobs/hello.py` against the three-region cluster."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_hello_job_reports_node_labels(three_region_cluster):
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, **three_region_cluster.env()}
    submit = subprocess.run(
        [ray_cli, "job", "submit", "--working-dir", ".", "--", "python", "jobs/hello.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert "succeeded" in submit.stdout
    job_id = next(w.strip("'") for line in submit.stdout.splitlines() if "submitted successfully" in line for w in line.split() if w.startswith("'raysubmit_"))
    status = subprocess.run([ray_cli, "job", "status", job_id], env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in status.stdout.lower()
    result = json.loads(next(line for line in submit.stdout.splitlines() if line.startswith("HELLO_RESULT ")).split(" ", 1)[1])
    placed = {r["asked_for_group"]: r["labels"] for r in result}
    assert set(placed) == {"head", "cpu", "gpu", "eu"}
    assert placed["eu"]["ray.io/availability-region"] == "eu-central-1"
    assert placed["gpu"]["ray.io/market-type"] == "spot"
    assert all(labels["ray.io/node-group"] == group for group, labels in placed.items())
