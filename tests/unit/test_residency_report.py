"""`mlplatform residency report`: where each job ran (the cluster's audit trail) and where each model
version was trained and is stored (the registry)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlplatform import registry, residency
from mlplatform._internal import metadata
from mlplatform.cli import main
from mlplatform.residency import audit

CLUSTER = "three-region"
N1, N2, N3 = "1" * 56, "2" * 56, "3" * 56


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Path:
    """A trail with two placed jobs (one reported where it ran) and a denial; a registry with m@1, m@2."""
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    for env in (metadata.URL_ENV, residency.POLICY_ENV, residency.CLUSTER_ENV, registry.ROOT_ENV):
        monkeypatch.delenv(env, raising=False)
    trail = audit.default_path(CLUSTER)
    selector = {"ray.io/availability-region": "me-central-1"}
    audit.append(trail, "placement", what="train", name="digits", job_id="01000000", policy="uae",
                 classification="uae-restricted", selector=selector)
    audit.append(trail, "ran", job_id="01000000", regions=["me-central-1"], node_ids=[N2, N1])
    audit.append(trail, "ran", job_id="01000000", regions=["me-central-1"], node_ids=[N3])
    audit.append(trail, "placement", what="export", name="digits", job_id="02000000", policy="uae",
                 classification="uae-restricted", selector=selector)
    audit.append(trail, "denial", what="train", name="eu-digits", job_id="03000000", reason="contradicts the policy")
    audit.append(trail, "sweep", job_id=None, placements=3, outside=0)  # not about one job's placement

    art = tmp_path / "artifact"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"w" * 100)
    (art / "metadata.json").write_text(json.dumps({
        "model_ref": "builtin:digits_mlp", "classification": "uae-restricted",
        "training_regions": ["me-central-1"], "training_node_ids": [N1], "job_id": "01000000",
    }))
    root = tmp_path / "registry"
    registry.register(art, "m", root=root)
    registry.register(art, "m", root=root)
    registry.set_alias("m", "production", 2, root=root)
    return root


def report(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["residency", "report", "--name", CLUSTER, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_reports_every_job_and_version(setup, capsys):
    code, out, _ = report(capsys, "--root", str(setup), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["audit_trail"] == str(audit.default_path(CLUSTER)) and data["registry"] == str(setup)
    jobs = {j["job_id"]: j for j in data["jobs"]}
    assert list(jobs) == ["01000000", "02000000", "03000000"]
    ran = jobs["01000000"]
    assert (ran["classification"], ran["regions"], ran["node_ids"]) == ("uae-restricted", ["me-central-1"], [N1, N2, N3])
    assert ran["placements"][0]["what"] == "train" and ran["placements"][0]["selector"] == {
        "ray.io/availability-region": "me-central-1"}
    assert (jobs["02000000"]["regions"], jobs["02000000"]["node_ids"]) == ([], [])  # placed, never reported
    assert jobs["03000000"]["denials"][0]["reason"] == "contradicts the policy"
    versions = {v["ref"]: v for v in data["versions"]}
    assert list(versions) == ["m@1", "m@2"]
    v2 = versions["m@2"]
    assert (v2["classification"], v2["training_regions"], v2["training_node_ids"], v2["aliases"]) == (
        "uae-restricted", ["me-central-1"], [N1], ["production"])
    assert v2["stored_at"] == str(setup / "m" / "versions" / "2" / "files") and v2["job_id"] == "01000000"


def test_one_job_or_one_version(setup, capsys):
    code, out, _ = report(capsys, "--job", "01000000", "--json")
    data = json.loads(out)
    assert code == 0 and "versions" not in data and [j["job_id"] for j in data["jobs"]] == ["01000000"]

    code, out, _ = report(capsys, "--model", "m@production", "--root", str(setup), "--json")
    data = json.loads(out)
    assert code == 0 and "jobs" not in data and [v["ref"] for v in data["versions"]] == ["m@2"]


def test_human_output_is_a_compact_table(setup, capsys):
    code, out, _ = report(capsys, "--root", str(setup))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"Jobs (audit trail {audit.default_path(CLUSTER)}):"
    assert lines[1].split() == ["JOB", "WHAT", "CLASSIFICATION", "RAN", "IN", "REGIONS", "ON", "NODES", "DENIED", "STOPPED", "OUTSIDE"]
    assert lines[2].split() == ["01000000", "train", "digits", "uae-restricted", "me-central-1",
                                ",".join(n[:12] for n in (N1, N2, N3)), "-", "-"]
    assert lines[3].split() == ["02000000", "export", "digits", "uae-restricted", "not", "recorded", "-", "-", "-"]
    assert lines[4].split() == ["03000000", "train", "eu-digits", "-", "not", "recorded", "-", "1", "-"]  # denied, never placed
    assert f"Model versions (registry {setup}):" in lines
    row = next(line for line in lines if line.startswith("m@2"))
    assert row.split() == ["m@2", "production", "uae-restricted", "me-central-1", N1[:12],
                           str(setup / "m" / "versions" / "2" / "files"), "-"]


def test_without_a_registry_the_jobs_are_reported_and_the_missing_root_said(setup, capsys):
    code, out, _ = report(capsys)
    assert code == 0 and "01000000" in out
    assert out.rstrip().endswith(f"Model versions: no registry (pass --root or set {registry.ROOT_ENV}).")


@pytest.mark.parametrize("args, message", [
    (["--job", "ffffffff"], "error: Got 'ffffffff' for `--job`; the audit trail .* has no record of it "
                            r"\(jobs recorded: 01000000, 02000000, 03000000\)"),
    (["--model", "ghost@production"], "error: No model 'ghost' in registry .*; registered models: m"),
    (["--model", "m@canary"], "error: Got 'canary' for `ref`; model 'm' has no alias 'canary'"),
    (["--job", "01000000", "--model", "m@1"], "error: Got both --job and --model"),
])
def test_unknown_job_or_model_is_one_clear_error(setup, capsys, args, message):
    code, out, err = report(capsys, "--root", str(setup), *args)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert re.match(message, err), err


def test_a_job_id_reused_after_a_cluster_restart_is_another_job(tmp_path, monkeypatch):
    """Ray numbers jobs afresh at each cluster start; the writer's session tells them apart."""
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    trail = tmp_path / "audit.jsonl"
    for session, name, region in (("s1", "first", "me-central-1"), ("s2", "second", "me-central-1")):
        audit.append(trail, "placement", what="train", name=name, job_id="04000000", classification="uae-restricted",
                     cluster_session=session)
        audit.append(trail, "ran", job_id="04000000", regions=[region], node_ids=[N1], cluster_session=session)
    from mlplatform.residency import report as residency_report

    both = residency_report.jobs(trail)
    assert [[p["name"] for p in j["placements"]] for j in both] == [["first"], ["second"]]
    assert [p["name"] for p in residency_report.jobs(trail, "04000000")[0]["placements"]] == ["second"]  # the latest
