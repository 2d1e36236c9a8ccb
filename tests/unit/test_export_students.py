"""Export of every candidate: static QDQ beside dynamic INT8, and compressed students gated against their teacher."""

from __future__ import annotations

from pathlib import Path

import pytest

from export_artifacts import digits_artifact
from mlplatform import registry
from mlplatform.errors import ExportError, InputSignatureError
from mlplatform.export import ExportSpec, export_model, format_report

FAST = {"seconds_per_case": 0.02, "warmup_runs": 1, "batch_sizes": [1, 32]}


def _student(root: Path, artifact: Path, name: str, method: str, teacher: str = "digits@1", **lineage):
    extra = {"compressed_from": teacher, "compression": {"method": method}}
    return registry.register(artifact, name, root=root, lineage={"extra": extra, **lineage}).ref


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """digits@1 (teacher), a pruned student as good as the teacher (its own weights), and a distilled
    student trained for one epoch only (it must fail the student gate)."""
    base = tmp_path_factory.mktemp("students")
    root = base / "registry"
    teacher = digits_artifact(base / "digits")
    registry.register(teacher, "digits", root=root)
    pruned = _student(root, teacher, "digits-pruned", "prune")
    weak = _student(root, digits_artifact(base / "weak", hidden=(4,), epochs=1), "digits-distilled", "distill")
    return root, base, pruned, weak


@pytest.fixture(scope="module")
def exported(students):
    root, _, pruned, weak = students
    # node_groups without a Ray cluster: measured in this process instead (and said so in a warning).
    spec = ExportSpec(students=[pruned, weak], benchmark={**FAST, "node_groups": ["cpu"]})
    return export_model("digits@1", spec, root=root)


def test_every_candidate_is_built_gated_and_benchmarked(students, exported):
    root = students[0]
    assert exported.deployable == {
        "onnx_fp32": True, "onnx_int8": True, "onnx_int8_qdq": True,
        "pruned_onnx_fp32": True, "pruned_onnx_int8": True,
        "distilled_onnx_fp32": False, "distilled_onnx_int8": False,  # one epoch of a 4-unit MLP
    }
    assert exported.passed  # a failed student loses only its own candidates
    weak = exported.variant("distilled_onnx_fp32")
    assert any("top1_agreement" in f and "short by" in f for f in weak.failures())
    version = registry.resolve(exported.version_ref, root=root)
    files = {f.path for f in version.files}
    assert {"model.int8.qdq.onnx", "model.pruned.onnx", "model.pruned.int8.onnx", "model.distilled.onnx",
            "model.distilled.int8.onnx"} <= files
    export = version.lineage.extra["export"]
    assert export["students"] == {"pruned": students[2], "distilled": students[3]}
    (bench,) = export["benchmarks"]
    assert bench["node_group"] is None and {"avx2", "vnni"} <= set(bench["cpu"])
    runtimes = {(r["runtime"], r["batch_size"]) for r in bench["rows"]}
    assert runtimes == {(v, b) for v in ["torch_fp32", *exported.deployable] for b in (1, 32)}
    text = format_report(exported)
    assert "distilled_onnx_int8 NOT DEPLOYABLE" in text and "Benchmark on this process" in text


def test_student_of_another_teacher_is_refused_before_any_work(students):
    root, base, _, _ = students
    other = _student(root, base / "digits", "digits-other", "prune", teacher="digits-pruned@1")
    with pytest.raises(ExportError, match=r"compressed_from 'digits-pruned@1', not the export's source digits@1"):
        export_model("digits@1", ExportSpec(students=[other]), root=root)


def test_missing_student_names_the_ref_and_jobs_compress(students):
    with pytest.raises(ExportError, match=r"'digits-nope@1' in `students`.*jobs/compress.py"):
        export_model("digits@1", ExportSpec(students=["digits-nope@1"]), root=students[0])


def test_student_with_other_inputs_or_a_duplicate_kind_is_refused(students):
    root, base, pruned, _ = students
    sig = {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, 32]]}
    narrow = _student(root, base / "digits", "digits-narrow", "distill", input_signature=sig)
    with pytest.raises(InputSignatureError, match="differs from digits@1"):
        export_model("digits@1", ExportSpec(students=[narrow]), root=root)
    with pytest.raises(ExportError, match="two pruned students"):
        export_model("digits@1", ExportSpec(students=[pruned, pruned]), root=root)
