"""Export of the built-in GPT decoder: dynamic batch, fixed sequence length, gate on logits."""

from __future__ import annotations

import numpy as np
import pytest

from export_artifacts import gpt_artifact
from mlplatform.export import ExportSpec, export_artifact

# ~1M parameters: the lm_tiny config of the training package.
TINY_GPT = {"vocab_size": 256, "seq_len": 64, "d_model": 128, "n_layer": 5, "n_head": 4}


@pytest.fixture(scope="module")
def lm_export(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    art = gpt_artifact(base / "gpt", TINY_GPT, steps=5)
    spec = ExportSpec(max_holdout_rows=32, benchmark={"enabled": False})
    return export_artifact(art, base / "out", spec), base / "out"


def test_lm_variants_pass_their_logit_gates(lm_export):
    report, _ = lm_export
    assert report.task == "causal_lm" and report.quantization == "dynamic"
    assert report.deployable == {"onnx_fp32": True, "onnx_int8": True}
    fp32, int8 = report.variant("onnx_fp32"), report.variant("onnx_int8")
    assert {c.metric for c in int8.checks} == {"max_abs_error", "mean_abs_error"}
    assert fp32.metrics["max_abs_error"] < 1e-3
    assert 0 < int8.metrics["mean_abs_error"] < 0.15
    assert int8.metrics["top1_agreement"] > 0.9  # next-token argmax, recorded but not gated
    assert report.holdout["rows"] == 32


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_lm_onnx_has_a_dynamic_batch_axis_and_fixed_sequence_length(lm_export, batch):
    import onnxruntime as ort

    _, out = lm_export
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "input_ids" and isinstance(inp.shape[0], str) and inp.shape[1] == 64
    ids = np.random.default_rng(0).integers(0, 256, (batch, 64), dtype=np.int64)
    assert sess.run(None, {"input_ids": ids})[0].shape == (batch, 64, 256)
