"""`variant: auto`: which gated ONNX variant a deployment gets, from the export's measurements (no Ray)."""

from __future__ import annotations

import pytest

from mlplatform.errors import ModelNotDeployable
from mlplatform.export import tuned_options
from mlplatform.serve._variant import choose, node_group

AVX2 = {"model": "x", "logical_cpus": 2, "avx2": True, "avx512": False, "vnni": False, "amx": False}
VNNI = {"model": "y", "logical_cpus": 8, "avx2": True, "avx512": True, "vnni": True, "amx": False}


def _rows(batch: int, **speeds: float) -> list[dict]:
    return [{"runtime": r, "batch_size": batch, "p50_ms": 1.0, "p99_ms": 2.0, "throughput": t, "runs": 10}
            for r, t in speeds.items()]


def _export(benchmarks, **deployable) -> dict:
    return {"deployable": deployable or {"onnx_fp32": True, "onnx_int8": True}, "benchmarks": benchmarks}


CPU_GROUP = {"node_group": "cpu", "cpu": VNNI, "threads": 2,
             "rows": _rows(8, torch_fp32=1e4, onnx_fp32=9e4, onnx_int8=5e4)
             + _rows(32, torch_fp32=2e4, onnx_fp32=2e5, onnx_int8=4.1e5)}
GPU_GROUP = {"node_group": "gpu", "cpu": AVX2, "threads": 2,
             "rows": _rows(32, torch_fp32=2e4, onnx_fp32=3e5, onnx_int8=1e5)}


def test_fastest_deployable_variant_of_the_deployments_group_at_its_batch_size():
    c = choose(_export([GPU_GROUP, CPU_GROUP]), "cpu", 32, "digits@2", "primary")
    assert c.variant == "onnx_int8"
    assert c.reason.startswith("onnx_int8: 410k rows/s at batch 32 on node group cpu (AVX2, AVX-512, VNNI)")
    assert "vs onnx_fp32 200k" in c.reason and "torch_fp32 20.0k" in c.reason


def test_batch_size_is_the_nearest_measured_one_not_above_max_batch_size_else_the_smallest():
    assert choose(_export([CPU_GROUP]), "cpu", 16, "d@2", "primary").variant == "onnx_fp32"  # batch 8
    assert "at batch 8 " in choose(_export([CPU_GROUP]), "cpu", 16, "d@2", "primary").reason
    assert "at batch 8 " in choose(_export([CPU_GROUP]), "cpu", 4, "d@2", "primary").reason  # none <= 4


def test_a_variant_that_failed_its_gate_is_never_chosen_however_fast():
    export = _export([CPU_GROUP], onnx_fp32=True, onnx_int8=False)
    c = choose(export, "cpu", 32, "d@2", "primary")
    assert c.variant == "onnx_fp32" and "1 variant(s) failed their gate (onnx_int8)" in c.reason


def test_a_student_wins_when_it_is_gated_and_fastest():
    rows = _rows(32, torch_fp32=2e4, onnx_fp32=2e5, distilled_onnx_int8=9e5, pruned_onnx_fp32=1e6)
    export = _export([{**CPU_GROUP, "rows": rows}], onnx_fp32=True, distilled_onnx_int8=True, pruned_onnx_fp32=False)
    assert choose(export, "cpu", 32, "d@2", "primary").variant == "distilled_onnx_int8"


def test_no_measurement_for_the_group_takes_the_nearest_with_the_same_cpu_flags_and_says_so():
    c = choose(_export([CPU_GROUP, GPU_GROUP]), "edge", 32, "d@2", "primary", local_cpu=AVX2)
    assert c.variant == "onnx_fp32"  # gpu group's numbers: same flags as this machine
    assert "no measurement on node group edge: nearest is node group gpu, same CPU flags" in c.reason
    c = choose(_export([CPU_GROUP]), None, 32, "d@2", "primary", local_cpu=AVX2)
    assert c.variant == "onnx_int8" and "no measurement with matching CPU flags" in c.reason


def test_no_benchmark_at_all_takes_onnx_fp32_and_says_why():
    c = choose(_export([]), "cpu", 32, "d@2", "primary")
    assert c.variant == "onnx_fp32" and "exported without a benchmark" in c.reason and "benchmark.enabled" in c.reason
    # Registered with ONNX files but not by `mlplatform export`: nothing recorded in the lineage.
    c = choose(None, "cpu", 32, "d@2", "primary", files={"model.onnx", "model.int8.onnx"})
    assert c.variant == "onnx_fp32" and "no export record" in c.reason


def test_auto_refused_without_an_exported_or_a_gate_passed_variant():
    with pytest.raises(ModelNotDeployable, match=r"d@1 has no exported ONNX variants.*mlplatform export --model d@1"):
        choose(None, "cpu", 32, "d@1", "primary", files={"model.safetensors"})
    with pytest.raises(ModelNotDeployable, match=r"every exported variant of d@2 failed.*onnx_fp32, onnx_int8"):
        choose(_export([CPU_GROUP], onnx_fp32=False, onnx_int8=False), "cpu", 32, "d@2", "primary")


def test_node_group_read_from_a_plain_selector_only():
    assert node_group({"ray.io/node-group": "cpu"}) == "cpu"
    assert node_group({"ray.io/node-group": "in(cpu,gpu)"}) is None and node_group({}) is None


def test_ort_options_follow_the_replicas_cpus():
    assert tuned_options(2)["intra_op_num_threads"] == 2 and tuned_options(2)["allow_spinning"]
    half = tuned_options(0.5)
    assert half["intra_op_num_threads"] == 1 and not half["allow_spinning"]  # a CPU share: no spinning


def test_build_app_resolves_auto_and_records_why(tmp_path):
    """Through the app builder (no cluster): the bound deployment runs the chosen variant and carries
    variant, reason and ORT options as its user_config (what `serve status` shows)."""
    from mlplatform import registry
    from mlplatform.serve import build_app

    art = tmp_path / "art"
    art.mkdir()
    for f in ("model.onnx", "model.int8.onnx", "metadata.json"):
        (art / f).write_text("{}")
    sig = {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, 64]]}
    registry.register(art, "digits", root=tmp_path / "reg",
                      lineage={"input_signature": sig, "extra": {"export": _export([CPU_GROUP])}})
    app = build_app({"name": "digits", "model": "digits@1", "registry_root": str(tmp_path / "reg"),
                     "primary": {"variant": "auto", "num_cpus": 0.5}, "ingress": {"colocate": True}})
    ingress = app._bound_deployment  # noqa: SLF001 - the Application's one bound deployment
    cfg = ingress._deployment_config.user_config  # noqa: SLF001
    assert cfg["variant"] == "onnx_int8" and cfg["variant_reason"].startswith("onnx_int8: 410k rows/s at batch 32")
    assert cfg["ort_options"]["intra_op_num_threads"] == 1
    assert ingress.init_args[0]["local_model"]["variant"] == "onnx_int8"
