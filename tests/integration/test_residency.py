"""Residency on the live three-region cluster: the policy `cluster up` gave it, preflight, where
restricted training ran (read from Ray's state API), and the audit trail's hash chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import REPO

DIGITS = REPO / "jobs/configs/digits.yaml"
REGION = "ray.io/availability-region"


def cli(*args: str) -> subprocess.CompletedProcess:
    """The `mlplatform` command as a user runs it (MLPLATFORM_HOME is the session's)."""
    return subprocess.run([sys.executable, "-m", "mlplatform", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "platform")})


def test_the_cluster_holds_the_policy_its_spec_names(three_region_cluster):
    shown = cli("residency", "show", "--name", three_region_cluster.name)
    assert shown.returncode == 0, shown.stderr
    assert "Residency policy 'uae'" in shown.stdout
    assert any(line.split()[:2] == ["uae-restricted", "me-central-1"] for line in shown.stdout.splitlines())


def test_residency_check_passes_the_shipped_spec_and_refuses_what_cannot_stay_home(three_region_cluster, tmp_path):
    name = ["--name", three_region_cluster.name]
    ok = cli("residency", "check", "--config", str(DIGITS), *name)
    assert ok.returncode == 0, ok.stderr
    assert "'uae-restricted' work may run in regions me-central-1" in ok.stdout

    spec = yaml.safe_load(DIGITS.read_text())
    eu = {**spec, "placement": {"label_selector": {"ray.io/node-group": "eu"}, "allow_spot": False}}
    big = {**spec, "resources_per_worker": {"CPU": 64}}
    for bad, missing in ((eu, "no node matches"), (big, "at most 0 workers of {'CPU': 64")):
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(bad))
        started = time.monotonic()
        refused = cli("residency", "check", "--config", str(path), *name)
        assert refused.returncode == 1 and time.monotonic() - started < 10
        for part in ("Classification 'uae-restricted' may only run in regions me-central-1", missing,
                     "eu (eu-central-1)", "inside the allowed regions: cpu, gpu, head"):
            assert part in refused.stderr, (part, refused.stderr)


def test_restricted_training_ran_only_in_the_uae_and_was_audited(trained_digits, three_region_cluster):
    import ray
    from ray.util.state import list_actors, list_tasks

    from mlplatform.cluster import connect, inventory
    from mlplatform.residency import audit

    trail = audit.default_path(three_region_cluster.name)
    placed = [r for r in audit.read(trail, "placement") if r["what"] == "train" and r["name"] == "digits-zero2"]
    assert placed and placed[-1]["classification"] == "uae-restricted"
    assert placed[-1]["selector"][REGION] == "me-central-1"
    job_id = placed[-1]["job_id"]

    connect(three_region_cluster.name)
    try:
        region_of = {n.node_id: n.labels.get(REGION) for n in inventory(three_region_cluster.name)}
        job = [("job_id", "=", job_id)]
        actors = list_actors(filters=job, detail=True, limit=10_000, raise_on_missing_output=False)
        tasks = list_tasks(filters=job, detail=True, limit=10_000, raise_on_missing_output=False)
    finally:
        ray.shutdown()
    # From Ray's state API, not from what the platform says it asked for: every actor and task of
    # the job, Ray Train's and Ray Data's own included (controller, preemption watcher, dataset
    # manager, Parquet metadata fetch, preprocessing, split coordinator).
    workers = [a for a in actors if a.class_name == "RayTrainWorker"]
    assert len(workers) >= 2 and len(tasks) > 10
    placed = [(a.class_name, region_of[a.node_id]) for a in actors] + [
        (t.name, region_of[t.node_id]) for t in tasks if t.node_id]
    # Ray Data's own block-splitting task among them: Dataset.split drops the selector in Ray 2.60,
    # so the platform splits with it (train/data.py _split_equal).
    assert [p for p in placed if p[1] != "me-central-1"] == []
    ran = [r for r in audit.read(trail, "ran") if r["job_id"] == job_id]
    assert ran and ran[-1]["regions"] == ["me-central-1"] and ran[-1]["outside"] == 0

    verified = cli("residency", "audit", "--verify", "--name", three_region_cluster.name)
    assert verified.returncode == 0, verified.stderr


def test_one_edited_audit_record_is_named_by_verify(trained_digits, three_region_cluster):
    name = ["--name", three_region_cluster.name]
    path = cli("residency", "audit", "--path", *name).stdout.strip()
    original = open(path, "rb").read()
    lines = original.decode().splitlines()
    record = json.loads(lines[0])
    record["classification"] = "public"  # what someone hiding a placement would change
    try:
        with open(path, "w") as f:
            f.write("\n".join([json.dumps(record, sort_keys=True, separators=(",", ":"))] + lines[1:]) + "\n")
        broken = cli("residency", "audit", "--verify", *name)
        assert broken.returncode == 1
        assert "line 1 (seq 1): its sha256 does not match its content" in broken.stderr
    finally:
        with open(path, "wb") as f:
            f.write(original)
    assert cli("residency", "audit", "--verify", *name).returncode == 0


def test_the_guard_stops_restricted_work_placed_outside_and_the_sweep_reports_it(ray_on_three_region):
    import ray

    from mlplatform.residency import audit, guard

    guard.declare("uae-restricted")  # this driver's job handles restricted data
    job_id = ray.get_runtime_context().get_job_id()
    eu = {REGION: "eu-central-1"}

    @ray.remote(max_retries=0)
    def touch() -> str:
        return ray.get_runtime_context().get_node_labels()[REGION]

    @ray.remote
    class Holder:
        def ping(self) -> int:
            return 1

    assert ray.get(touch.options(label_selector={REGION: "me-central-1"}).remote(), timeout=120) == "me-central-1"
    # The policy's selector stripped on purpose: pinned to the EU node, the workers refuse to start.
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(touch.options(label_selector=eu).remote(), timeout=120)
    # An actor classified by its own runtime env, not by the job's declaration.
    holder = Holder.options(label_selector=eu, runtime_env={"env_vars": {guard.CLASSIFICATION_ENV: "uae-restricted"}})
    with pytest.raises(ray.exceptions.ActorDiedError, match="Residency guard stopped this worker"):
        ray.get(holder.remote().ping.remote(), timeout=120)

    settled(job_id, 2)
    swept = cli("residency", "sweep", "--job", job_id, "--name", ray_on_three_region.name)
    assert swept.returncode == 1, swept.stdout + swept.stderr
    assert "touch" in swept.stderr and "eu-central-1" in swept.stderr and "1 of 2 actor(s)/task(s)" in swept.stderr

    # The stopped workers' own records, moved into the trail by its writer (the sweep flushed it);
    # at least the two refused (Ray may have started more than one worker process for them).
    trail = audit.default_path(ray_on_three_region.name)
    stopped = [r for r in audit.read(trail, "violation") if r["job_id"] == job_id and r["what"] == "worker"]
    assert len(stopped) >= 2 and {r["region"] for r in stopped} == {"eu-central-1"}
    assert {r["classification"] for r in stopped} == {"uae-restricted"}


def test_public_work_may_use_the_eu_node(ray_on_three_region):
    import ray

    from mlplatform.residency import guard

    guard.declare("public")
    job_id = ray.get_runtime_context().get_job_id()

    @ray.remote
    def touch() -> str:
        return ray.get_runtime_context().get_node_labels()[REGION]

    assert ray.get(touch.options(label_selector={REGION: "eu-central-1"}).remote(), timeout=120) == "eu-central-1"
    settled(job_id, 1)
    swept = cli("residency", "sweep", "--job", job_id, "--name", ray_on_three_region.name)
    assert swept.returncode == 0 and "1 actor(s)/task(s) of 1 job(s)" in swept.stdout, swept.stdout + swept.stderr


def settled(job_id: str, tasks: int) -> None:
    """Wait until Ray's state API lists the job's tasks: workers report task events about once a second."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + 30
    while len([t for t in list_tasks(filters=[("job_id", "=", job_id)], raise_on_missing_output=False)
               if t.type == "NORMAL_TASK" and t.state in ("FINISHED", "FAILED")]) < tasks:
        assert time.monotonic() < deadline, f"job {job_id}: Ray's state API never listed {tasks} finished task(s)"
        time.sleep(0.5)


def test_a_policy_change_is_refused_while_restricted_work_runs_and_applied_after(ray_on_three_region, tmp_path):
    import ray

    from mlplatform.residency import audit, guard

    name = ["--name", ray_on_three_region.name]
    shipped = REPO / "cluster_configs/residency/uae.yaml"
    policy = yaml.safe_load(shipped.read_text())
    widened = tmp_path / "widened.yaml"
    policy["classifications"]["uae-restricted"]["regions"] = ["me-central-1", "eu-central-1"]
    widened.write_text(yaml.safe_dump(policy))
    reworded = tmp_path / "reworded.yaml"
    policy = yaml.safe_load(shipped.read_text())
    policy["classifications"]["public"]["description"] = "Open data."
    reworded.write_text(yaml.safe_dump(policy))

    guard.declare("uae-restricted")  # this test's driver is a running restricted job
    job_id = ray.get_runtime_context().get_job_id()
    refused = cli("residency", "apply", "--policy", str(widened), *name)
    assert refused.returncode == 1
    assert f"running job(s) {job_id} (uae-restricted)" in refused.stderr, refused.stderr
    # A rule no running job works under may change; the original goes back the same way.
    try:
        applied = cli("residency", "apply", "--policy", str(reworded), *name)
        assert applied.returncode == 0, applied.stderr
        assert "Open data." in json.dumps(json.loads(ray.experimental.internal_kv._internal_kv_get(
            "residency/policy", namespace="mlplatform")))
    finally:
        assert cli("residency", "apply", "--policy", str(shipped), *name).returncode == 0
    trail = audit.default_path(ray_on_three_region.name)
    assert [r["new"] for r in audit.read(trail, "policy")][-2:] == ["uae", "uae"]
    assert any(r["what"] == "policy" and job_id in r["reason"] for r in audit.read(trail, "denial"))


def test_a_submitted_job_runs_its_workers_under_the_guard_without_asking(three_region_cluster):
    """`cluster up` gave every node the guard: a job's workers run it whatever the job says, and a
    job that brings its own setup hook (which would replace it) is refused."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {**os.environ, **three_region_cluster.env()}
    probe = (
        "import ray\nfrom mlplatform.residency import guard\nray.init()\nguard.declare('uae-restricted')\n"
        "f = ray.remote(max_retries=0)(lambda: 1)\n"
        "try:\n    ray.get(f.options(label_selector={'ray.io/availability-region': 'eu-central-1'}).remote())\n"
        "    print('RAN OUTSIDE')\nexcept ray.exceptions.WorkerCrashedError:\n    print('STOPPED BY THE GUARD')\n"
    )
    done = subprocess.run([ray_cli, "job", "submit", "--", "python", "-c", probe], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0 and "STOPPED BY THE GUARD" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]

    own = subprocess.run([ray_cli, "job", "submit", "--runtime-env-json", '{"worker_process_setup_hook": "os.getpid"}',
                          "--", "python", "-c", "import ray; ray.init()"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert own.returncode != 0 and "that hook is the residency guard" in own.stdout + own.stderr, own.stdout[-2000:]


def test_records_from_every_node_reach_one_chain_through_the_head_writer(ray_on_three_region):
    """On a cluster of many machines a worker's disk is not the head's: connected processes append
    through one writer actor on the head node. Here 20 tasks on the UAE and EU nodes at once."""
    import uuid

    import ray
    from ray.util.state import list_actors

    from mlplatform.cluster import inventory
    from mlplatform.residency import audit, guard, record

    guard.declare("public")
    token = uuid.uuid4().hex

    @ray.remote(num_cpus=0)
    def note(i: int) -> int:
        record("note", token=token, i=i)
        return os.getpid()

    regions = ["me-central-1", "eu-central-1"]
    pids = ray.get([note.options(label_selector={REGION: regions[i % 2]}).remote(i) for i in range(20)], timeout=120)
    trail = audit.default_path(ray_on_three_region.name)
    notes = [r for r in audit.read(trail, "note") if r["token"] == token]
    assert sorted(r["i"] for r in notes) == list(range(20))
    assert {r["from_pid"] for r in notes} == set(pids) and not {r["pid"] for r in notes} & set(pids)
    assert audit.verify(trail).ok
    writer = list_actors(filters=[("class_name", "=", "AuditWriter"), ("state", "=", "ALIVE")], detail=True)
    head = next(n.node_id for n in inventory(ray_on_three_region.name) if n.group == "head")
    assert [a.node_id for a in writer] == [head]
