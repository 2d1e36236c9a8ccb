"""The issues' "done when", through `ray job submit`: train digits, register, export + gate INT8."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from conftest import REPO, job_placements, submit_job

pytestmark = pytest.mark.timeout(900)


def test_train_register_export_through_job_submit(three_region_cluster, restricted_tmp, monkeypatch):
    from mlplatform import registry
    from mlplatform.export import ExportReport
    from mlplatform.train import load_model, read_metadata

    # A fresh run name: the shipped one may hold a finished run, which would resume and train nothing.
    run = f"digits-e2e-{uuid.uuid4().hex[:8]}"
    out = submit_job(three_region_cluster, "jobs/train.py", "--config", "jobs/configs/digits.yaml", "--name", run)
    # The job's log (what `ray job logs` prints under its own header): plain text, no progress bars'
    # cursor moves (ESC[A) nor coloured worker prefixes.
    from ray.job_submission import JobSubmissionClient

    from mlplatform.cluster.connect import authenticate

    job_id = next(w.strip("'") for line in out.splitlines() if "submitted successfully" in line for w in line.split()
                  if w.strip("'").startswith("raysubmit_"))
    logs = JobSubmissionClient(authenticate(three_region_cluster.name).dashboard_url).get_job_logs(job_id)
    assert "artifact " in logs
    # Ray 2.60 hard-codes colour (SGR, ESC[..m) in two messages of its own whatever the output: ray.init's
    # "View the dashboard at" and log deduplication's "[repeated Nx across cluster]". What the platform
    # controls must be plain: no cursor moves or line erases (progress bars), no coloured "(pid=...)" prefixes.
    import re

    cursor = [line for line in logs.splitlines() if re.search(r"\x1b\[[0-9;?]*[A-HJKSTfhlsu]", line)]
    assert not cursor, f"{len(cursor)} line(s) of the job's log move the cursor (progress bars), e.g. {cursor[:3]!r}"
    coloured = [line for line in logs.splitlines() if line.startswith("\x1b[")]
    assert not coloured, f"{len(coloured)} line(s) of the job's log start with a colour code, e.g. {coloured[:3]!r}"
    artifact = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("artifact "))
    metadata = read_metadata(artifact)
    assert metadata["metrics"]["val_accuracy"] >= 0.95
    training = metadata["training"]
    assert (training["steps"], training["resumed_from_step"]) == (176, 0)  # trained every step, here
    # What the two workers' DeepSpeed engines ran, as they reported it.
    assert [(e["zero_stage"], e["bf16"], e["world_size"]) for e in training["engine"]] == [(2, True, 2)] * 2
    assert load_model(artifact) is not None
    ran_only_in_the_uae(three_region_cluster, run)

    root = str(restricted_tmp / "registry")  # restricted models live inside the policy's prefixes
    trained = registry.register(artifact, "digits", root=root)
    out = submit_job(
        three_region_cluster, "jobs/export.py", "--model", trained.ref, "--quantize", "int8",
        "--config", "jobs/configs/export-digits.yaml", "--root", root,
    )
    assert re.search(r"onnx_int8 +DEPLOYABLE", out), out[-3000:]
    # The exported version is restricted: encrypted, its lineage sealed under the cluster's key, which
    # this process holds as the cluster's client (MLPLATFORM_CLUSTER names whose key).
    monkeypatch.setenv("MLPLATFORM_CLUSTER", three_region_cluster.name)
    exported = registry.resolve("digits@latest", root=root)
    assert exported.version == trained.version + 1
    assert exported.lineage.extra["exported_from"] == trained.ref
    assert {"model.onnx", "model.int8.onnx", "export_report.json"} <= {f.path for f in exported.files}
    assert registry.verify(exported.ref, root=root).ok
    fetched = restricted_tmp / "fetched"
    registry.fetch(exported.ref, fetched, root=root)
    report = ExportReport.from_json(json.loads((fetched / "export_report.json").read_text()))
    assert report.deployable == {"onnx_fp32": True, "onnx_int8": True, "onnx_int8_qdq": True}
    # Measured on the `cpu` node group (jobs/configs/export-digits.yaml), as `variant: auto` reads it.
    assert [b.node_group for b in report.benchmarks] == ["cpu"]


def ran_only_in_the_uae(cluster, run: str) -> None:
    """Issue 12's done-when: every actor and task of the submitted job, Ray Train's and Ray Data's
    own included, ran on a me-central-1 node, as Ray's state API reports it; the sweep agrees."""
    from mlplatform.residency import audit

    trail = audit.default_path(cluster.name)
    job_id = next(r["job_id"] for r in audit.read(trail, "placement") if r.get("name") == run)
    placed = job_placements(cluster, job_id)
    assert {"RayTrainWorker", "TrainController"} <= {name for name, _ in placed}, placed
    assert [p for p in placed if p[1] != "me-central-1"] == []
    swept = mlplatform("residency", "sweep", "--job", job_id, "--name", cluster.name)
    assert swept.returncode == 0 and swept.stdout.startswith("ok  "), swept.stdout + swept.stderr
    verified = mlplatform("residency", "audit", "--verify", "--name", cluster.name)
    assert verified.returncode == 0, verified.stderr


def mlplatform(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlplatform", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
