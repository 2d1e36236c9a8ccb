"""Export of a digits classifier through the registry: ONNX FP32 + INT8, gates, benchmark, bad input."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from export_artifacts import digits_artifact
from mlplatform import config, registry
from mlplatform.errors import (
    AliasNotFound,
    ExportError,
    HoldoutDataError,
    InputSignatureError,
    OnnxModelError,
    RegistryNotWritable,
    SpecError,
    VersionNotFound,
)
from mlplatform.export import (
    ExportReport,
    ExportSpec,
    export_artifact,
    export_model,
    format_report,
    gate_variant,
    make_spec,
)

# Short benchmark: the test checks that it is recorded, not how fast anything is.
FAST = ExportSpec(benchmark={"seconds_per_case": 0.05, "warmup_runs": 1})


@pytest.fixture(scope="module")
def digits_registry(tmp_path_factory) -> Path:
    """A registry root holding digits@1, a digits MLP trained for a few seconds."""
    base = tmp_path_factory.mktemp("export")
    root = base / "registry"
    registry.register(digits_artifact(base / "digits"), "digits", root=root)
    return root


@pytest.fixture(scope="module")
def exported(digits_registry) -> ExportReport:
    """digits@1 exported once for the module: the report of digits@2."""
    return export_model("digits@latest", FAST, root=digits_registry)


def test_export_registers_next_version_with_both_variants_deployable(digits_registry, exported):
    assert exported.source_ref == "digits@1" and exported.version_ref == "digits@2"
    assert exported.deployable == {"onnx_fp32": True, "onnx_int8": True, "onnx_int8_qdq": True}
    assert exported.quantization == "dynamic" and exported.opset == 18
    fp32, int8 = exported.variant("onnx_fp32"), exported.variant("onnx_int8")
    assert fp32.metrics["top1_agreement"] >= 0.999
    assert int8.metrics["top1_agreement"] >= 0.98
    assert abs(int8.metrics["accuracy_drop"]) <= 0.01
    assert exported.holdout["labeled"] and exported.holdout["rows"] == 360
    assert int8.size_bytes < fp32.size_bytes / 2

    parent, child = registry.resolve("digits@1", root=digits_registry), registry.resolve("digits@2", root=digits_registry)
    parent_files = {f.path: f.sha256 for f in parent.files}
    child_files = {f.path: f.sha256 for f in child.files}
    assert set(child_files) == set(parent_files) | {"model.onnx", "model.int8.onnx", "model.int8.qdq.onnx",
                                                    "export_report.json"}
    assert all(child_files[p] == h for p, h in parent_files.items())  # source files unchanged
    assert child.lineage.extra["exported_from"] == "digits@1"
    assert child.lineage.extra["export"]["deployable"] == exported.deployable
    # What `variant: auto` chooses by: rows/s per runtime and batch size, with the CPU's flags.
    (bench,) = child.lineage.extra["export"]["benchmarks"]
    assert bench["threads"] == 2 and "vnni" in bench["cpu"] and len(bench["rows"]) == len(exported.benchmark)
    assert child.lineage.input_signature == parent.lineage.input_signature
    assert child.lineage.metrics["val_accuracy"] == parent.lineage.metrics["val_accuracy"]
    assert child.lineage.metrics["onnx_int8_top1_agreement"] == int8.metrics["top1_agreement"]


def test_report_is_stored_with_the_version_and_has_the_benchmark(digits_registry, exported, tmp_path):
    registry.fetch("digits@2", tmp_path / "v2", root=digits_registry)
    stored = ExportReport.from_json(json.loads((tmp_path / "v2" / "export_report.json").read_text()))
    assert stored.variants == exported.variants and stored.version_ref is None  # written before registration
    cases = {(r.runtime, r.batch_size) for r in stored.benchmark}
    assert cases == {(rt, b) for rt in ("torch_fp32", "onnx_fp32", "onnx_int8", "onnx_int8_qdq") for b in (1, 8, 32)}
    assert all(r.throughput > 0 and r.p99_ms >= r.p50_ms for r in stored.benchmark)
    assert stored.threads == 2 and stored.cpu.logical_cpus >= 1
    text = format_report(exported)
    assert "digits@2" in text and "DEPLOYABLE" in text and "torch_fp32" in text


def test_damaged_int8_variant_fails_its_gate_and_says_by_how_much(digits_registry, exported, tmp_path):
    import onnx
    from onnx import numpy_helper

    art = tmp_path / "v2"
    registry.fetch("digits@2", art, root=digits_registry)
    model = onnx.load(art / "model.int8.onnx")
    rng = np.random.default_rng(0)
    damaged = 0
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.int8 and w.size > 100:  # quantized weight matrices
            noisy = np.clip(w.astype(np.int16) + rng.integers(-60, 61, w.shape), -127, 127).astype(np.int8)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
            damaged += 1
    assert damaged >= 2
    onnx.save(model, art / "damaged.int8.onnx")

    result = gate_variant(art / "damaged.int8.onnx", art, FAST, variant="onnx_int8")
    assert not result.deployable
    agreement = next(c for c in result.checks if c.metric == "top1_agreement")
    assert not agreement.passed and agreement.shortfall == pytest.approx(0.98 - agreement.value)
    message = result.failures()[0]
    assert f"< 0.980 required, short by {agreement.shortfall:.3f}" in message
    # The intact file passes the same gate.
    assert gate_variant(art / "model.int8.onnx", art, FAST).deployable


def test_truncated_onnx_is_a_clear_error(digits_registry, exported, tmp_path):
    art = tmp_path / "v2"
    registry.fetch("digits@2", art, root=digits_registry)
    data = (art / "model.onnx").read_bytes()
    (art / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match=r"cut.onnx: ONNX Runtime cannot load it .*corrupt or truncated"):
        gate_variant(art / "cut.onnx", art, FAST, variant="onnx_fp32")
    (art / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="corrupt or truncated"):
        gate_variant(art / "junk.onnx", art, FAST)


def test_static_int8_calibrates_on_training_rows(digits_registry, exported, tmp_path):
    art = tmp_path / "v1"
    registry.fetch("digits@1", art, root=digits_registry)
    spec = ExportSpec(quantization_mode="static", benchmark={"enabled": False})
    report = export_artifact(art, tmp_path / "out", spec)
    assert report.quantization == "static" and report.benchmark == ()
    assert report.variant("onnx_int8").metrics["top1_agreement"] >= 0.95
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [p.name for p in art.iterdir()] + ["model.onnx", "model.int8.onnx", "export_report.json"]
    )


def test_quantize_none_builds_only_fp32(digits_registry, exported, tmp_path):
    art = tmp_path / "v1"
    registry.fetch("digits@1", art, root=digits_registry)
    report = export_artifact(art, tmp_path / "out", ExportSpec(quantize="none", benchmark={"enabled": False}))
    assert [v.variant for v in report.variants] == ["onnx_fp32"] and report.quantization is None
    assert not (tmp_path / "out" / "model.int8.onnx").exists()


# ---------------------------------------------------------------- bad input: clear error, nothing registered


def _versions(root: Path, name: str) -> list[int]:
    return [v.version for v in registry.list_versions(name, root=root)]


def test_missing_input_signature_is_refused_before_any_work(digits_registry, exported, tmp_path):
    art = tmp_path / "nosig"
    registry.fetch("digits@1", art, root=digits_registry)
    meta = json.loads((art / "metadata.json").read_text())
    del meta["input_signature"]
    (art / "metadata.json").write_text(json.dumps(meta))
    registry.register(art, "nosig", root=digits_registry)
    with pytest.raises(InputSignatureError, match=r"nosig@1: metadata.json has no `input_signature`.*register"):
        export_model("nosig@1", FAST, root=digits_registry)
    assert _versions(digits_registry, "nosig") == [1]


@pytest.mark.parametrize("ref,error,message", [
    ("digits@canary", AliasNotFound, "Got 'canary' for `ref`; model 'digits' has no alias 'canary'"),
    ("digits@99", VersionNotFound, "Got 99 for `ref`; model 'digits' has versions 1-2"),
])
def test_unknown_alias_or_version_is_the_registry_error(digits_registry, exported, ref, error, message):
    before = _versions(digits_registry, "digits")
    with pytest.raises(error, match=message):
        export_model(ref, FAST, root=digits_registry)
    assert _versions(digits_registry, "digits") == before


def test_unreadable_holdout_path_names_the_field(digits_registry, exported, tmp_path):
    before = _versions(digits_registry, "digits")
    spec = ExportSpec(holdout_path=str(tmp_path / "nope.parquet"), benchmark={"enabled": False})
    with pytest.raises(HoldoutDataError, match=r"nope.parquet' for `holdout_path`; cannot read it as Parquet"):
        export_model("digits@1", spec, root=digits_registry)
    assert _versions(digits_registry, "digits") == before


def test_unreadable_validation_data_fails_instead_of_weakening_the_gate(digits_registry, exported, tmp_path):
    art = tmp_path / "lost"
    registry.fetch("digits@1", art, root=digits_registry)
    meta = json.loads((art / "metadata.json").read_text())
    validation = meta["dataset"]["validation"]
    meta["dataset"]["validation"] = str(tmp_path / "moved-away.parquet")
    (art / "metadata.json").write_text(json.dumps(meta))
    registry.register(art, "lost", root=digits_registry)
    fix = r"cannot read it as Parquet .*pass a readable Parquet copy of it as `holdout_path`"
    with pytest.raises(HoldoutDataError, match=rf"moved-away.parquet' for `metadata.dataset.validation`; {fix}"):
        export_model("lost@1", FAST, root=digits_registry)
    assert _versions(digits_registry, "lost") == [1]

    # A file that is there but not Parquet: the same error, never the training rows instead.
    (tmp_path / "moved-away.parquet").write_bytes(b"not parquet")
    with pytest.raises(HoldoutDataError, match=rf"moved-away.parquet' for `metadata.dataset.validation`; {fix}"):
        export_artifact(art, tmp_path / "out", FAST)
    assert not (tmp_path / "out").exists()

    # The fix the error names works: the validation data passed as `holdout_path`.
    report = export_model("lost@1", ExportSpec(holdout_path=validation, benchmark={"enabled": False}),
                          root=digits_registry)
    assert report.holdout == {"source": validation, "rows": 360, "labeled": True}
    assert _versions(digits_registry, "lost") == [1, 2]


def test_read_only_registry_is_refused_first_and_nothing_is_written(digits_registry, exported, tmp_path, monkeypatch):
    from mlplatform.export import _pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the export ran before the registry was found unwritable")

    monkeypatch.setattr(_pipeline, "export_artifact", no_work)
    root = tmp_path / "ro"
    shutil.copytree(digits_registry, root)
    # Readable, but the new version cannot be staged: a regular file where registering creates
    # its staging directory stops root too (directory permissions would not; the tests run as root).
    shutil.rmtree(root / "digits" / ".staging", ignore_errors=True)
    (root / "digits" / ".staging").write_text("")
    match = r"ro \(`root`\) is not writable for model 'digits'.*Nothing was written"
    with pytest.raises(RegistryNotWritable, match=match):
        export_model("digits@1", FAST, root=root)
    assert _versions(root, "digits") == [1, 2]
    assert (root / "digits" / ".staging").read_text() == ""


def test_out_dir_that_is_not_empty_is_refused(digits_registry, exported, tmp_path):
    art = tmp_path / "v1"
    registry.fetch("digits@1", art, root=digits_registry)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="`out_dir`; it exists and is not empty"):
        export_artifact(art, tmp_path / "busy", FAST)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]


# ---------------------------------------------------------------- spec


def test_spec_overrides_are_validated():
    assert make_spec(quantize="none").quantize.value == "none"
    assert make_spec(threads=4).benchmark.threads == 4
    with pytest.raises(SpecError, match="quantize"):
        make_spec(quantize="int4")
    with pytest.raises(SpecError, match="opset"):
        config.validate({"opset": 11}, ExportSpec, "test")
    with pytest.raises(SpecError, match="unknown field"):
        config.validate({"gates": {"int8": {"min_agreement": 0.9}}}, ExportSpec, "test")


def test_shipped_export_config_loads():
    spec = make_spec(REPO / "jobs/configs/export-digits.yaml")
    assert spec.quantize.value == "int8" and spec.benchmark.batch_sizes == [1, 8, 32]


def test_export_errors_pickle():
    for cls in (ExportError, OnnxModelError, InputSignatureError, HoldoutDataError):
        err = pickle.loads(pickle.dumps(cls("what; why; fix")))
        assert type(err) is cls and str(err) == "what; why; fix"
