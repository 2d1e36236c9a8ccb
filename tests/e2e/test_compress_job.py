"""Issue 16's done-when: `jobs/compress.py` registers a pruned and a distilled digits model with lineage
to the teacher and gate results, its work having run only in the teacher's regions."""

import pytest

from conftest import job_placements, submit_job

pytestmark = pytest.mark.timeout(600)


def test_compress_job_registers_gated_students_in_region(three_region_cluster, trained_digits, restricted_tmp,
                                                         monkeypatch):
    from mlplatform import registry
    from mlplatform.compress._run import TASK_NAME
    from mlplatform.residency import audit
    from mlplatform.train import load_model

    root = str(restricted_tmp / "registry")
    teacher = registry.register(trained_digits, "digits", root=root)
    out = submit_job(three_region_cluster, "jobs/compress.py", "--model", "digits", "--config",
                     "jobs/configs/compress-digits.yaml", "--root", root, timeout_s=500)
    assert "gate PASSED" in out, out[-3000:]

    monkeypatch.setenv("MLPLATFORM_CLUSTER", three_region_cluster.name)  # restricted: sealed under its key
    for name, method, hidden in (("digits-pruned", "prune", [64]), ("digits-distilled", "distill", [32])):
        v = registry.resolve(f"{name}@latest", root=root)
        assert v.lineage.classification == teacher.lineage.classification == "uae-restricted"
        assert v.lineage.input_signature == teacher.lineage.input_signature
        assert v.lineage.extra["compressed_from"] == teacher.ref
        c = v.lineage.extra["compression"]
        assert c["method"] == method and c["params_after"] < c["params_before"]
        assert c["gate"]["passed"] and c["gate"]["top1_agreement"] >= 0.97, c["gate"]
        assert c["gate"]["accuracy_drop"] <= 0.01
        assert v.lineage.training_regions == ["me-central-1"]
        fetched = restricted_tmp / name
        registry.fetch(v.ref, fetched, root=root)
        model = load_model(fetched)  # a normal training artifact: what export loads
        assert [m.out_features for m in model if hasattr(m, "out_features")][:-1] == hidden

    # Where the work ran, as Ray's state API reports it: the compression task, and everything else of the job.
    trail = audit.default_path(three_region_cluster.name)
    job_id = [r["job_id"] for r in audit.read(trail, "placement") if r.get("what") == "compress"][-1]
    placed = job_placements(three_region_cluster, job_id)
    assert (TASK_NAME, "me-central-1") in placed, placed
    assert [p for p in placed if p[1] != "me-central-1"] == []
