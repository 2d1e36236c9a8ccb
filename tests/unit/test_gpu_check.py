"""The GPU check's CPU dry run: scripts/gpu_check.sh end to end at tiny sizes, so it cannot rot
between the sessions that have a GPU to run it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


# 80 s on 2 cores: with `make test-slow` (CI runs it right after `make test`), so it still cannot rot.
@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/gpu_check.sh"), "--device", "cpu", "--tiny", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())

    train = {r["config"]: r for r in results["train"]}
    for name in ("zero0-bf16", "zero1-bf16", "zero2-bf16", "zero3-bf16", "zero2-bf16-ckpt"):
        row = train[name]
        assert row["ok"], row
        assert row["engine"]["zero_stage"] == int(name[4]) and row["engine"]["bf16"]
        assert row["loss_last"] < 0.8 * row["loss_first"]
        assert row["val_loss_restored"] == row["val_loss"]
    # What a CPU cannot run is skipped in the spec's own words, not silently dropped.
    assert "fp16 needs a GPU" in train["zero2-fp16"]["skipped"]
    assert "offload_optimizer" in train["zero2-bf16-offload-opt"]["skipped"]

    memory = {r["config"]: r for r in results["memory"]}
    assert memory["zero3-bf16"]["ok"] and memory["zero3-bf16"]["predicted_bytes"] > 0
    assert memory["zero3-bf16"]["engine"]["params_local"] == memory["zero3-bf16"]["num_params"]
    assert all(r["ok"] and r["measured_width"] for r in results["width"] if "skipped" not in r)
    assert {r["batch"] for r in results["serve"]["torch"]} == {1, 8}
    # The gpu-marked tests were collected and skipped with the reason, none failed.
    cases = results["pytest"]["cases"]
    assert cases and all(c["outcome"] == "skipped" and "Requires: CUDA" in c["message"] for c in cases)
    summary = (out / "summary.md").read_text()
    assert "| zero3-bf16 | yes |" in summary and "## Serving forward path" in summary
