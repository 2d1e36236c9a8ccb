"""Training on the live three-region cluster: ZeRO stages, a worker killed mid-run, the artifact.

Each run is the shipped digits config (2 CPU workers on the UAE `cpu` group, bf16) with
its own storage path. ZeRO-2 is exercised by the kill/resume test, which must also reach
the accuracy bar.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from mlplatform import config
from mlplatform.errors import PreflightError
from mlplatform.train import TrainSpec, load_model, read_metadata, train
from mlplatform.train.loop import FAULT_ENV

DIGITS = REPO / "jobs/configs/digits.yaml"


def digits_spec(tmp_path: Path, **update) -> TrainSpec:
    spec = config.load(DIGITS, TrainSpec)
    return spec.model_copy(update={"storage_path": str(tmp_path / "runs"), **update})


def reload_accuracy(artifact_dir: str) -> float:
    meta = read_metadata(artifact_dir)
    table = pq.read_table(meta["dataset"]["validation"])
    columns = meta["input_signature"]["feature_columns"]
    x = torch.from_numpy(np.stack([table[c].to_numpy() for c in columns], axis=1).astype(np.float32))
    y = torch.tensor(table["label"].to_numpy())
    with torch.no_grad():
        return int((load_model(artifact_dir)(x).argmax(-1) == y).sum()) / len(y)


def check_artifact(artifact_dir: str, stage: int) -> dict:
    root = Path(artifact_dir)
    assert {p.name for p in root.iterdir()} == {"model.safetensors", "metadata.json", "reference_sample.parquet"}
    meta = read_metadata(root)
    assert meta["model_ref"] == "builtin:digits_mlp" and meta["model_kwargs"] == {"hidden": [256]}
    assert meta["training"]["zero_stage"] == stage and meta["training"]["precision"] == "bf16"
    assert meta["dataset_fingerprint"].startswith("sha256:") and len(meta["dataset_fingerprint"]) == 71
    assert meta["input_signature"]["shapes"] == [[-1, 64]] and meta["input_signature"]["dtypes"] == ["float32"]
    assert meta["spec"]["zero_stage"] == stage and meta["created_at"]
    sample = pq.read_table(root / "reference_sample.parquet")
    assert sample.num_rows == 256 and sample.schema.names == meta["input_signature"]["feature_columns"]
    # The artifact holds fp32 weights that reproduce the reported accuracy exactly.
    from safetensors import safe_open

    with safe_open(str(root / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert meta["metrics"]["val_accuracy"] >= 0.95
    assert reload_accuracy(artifact_dir) == pytest.approx(meta["metrics"]["val_accuracy"], abs=1e-9)
    return meta


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_stage_trains_digits_to_the_bar(ray_on_three_region, tmp_path, stage):
    spec = digits_spec(tmp_path, zero_stage=stage, name=f"digits-zero{stage}")
    result = train(spec)
    assert result.zero_stage == stage and result.precision == "bf16"
    assert result.steps == 8 * 22  # 8 epochs × (1437 train rows // 2 workers // 32) steps
    check_artifact(result.artifact_dir, stage)
    # keep_last: 2 — older checkpoints were deleted.
    assert sorted(p.name for p in Path(spec.storage_path, spec.name).glob("checkpoint_step*")) == [
        "checkpoint_step00000150",
        "checkpoint_step00000176",
    ]


def test_worker_killed_mid_run_resumes_from_its_checkpoint(ray_on_three_region, tmp_path, monkeypatch):
    # Rank 1 exits hard (os._exit) at step 60, once; the last checkpoint before it is step 50.
    marker = tmp_path / "fault-tripped"
    monkeypatch.setenv(FAULT_ENV, f"1:60:{marker}")
    spec = digits_spec(tmp_path, name="digits-kill")
    result = train(spec)

    assert json.loads(marker.read_text())["step"] == 60  # the fault really happened
    lines = [line.split()[:2] for line in Path(spec.storage_path, spec.name, "steps.log").read_text().splitlines()]
    attempts: dict[str, list[int]] = {}
    for step, pid in lines:
        attempts.setdefault(pid, []).append(int(step))
    first, second = attempts.values()
    assert first == list(range(1, 61))  # ran up to the fault
    assert second == list(range(51, 177))  # resumed right after the step-50 checkpoint, to the end
    steps = [s for s, _ in ((int(a), b) for a, b in lines)]
    assert max(steps) == 176 == result.steps  # same step count as an uninterrupted run
    assert all(steps.count(s) == 1 for s in range(1, 51))  # nothing before the checkpoint ran twice
    check_artifact(result.artifact_dir, 2)


def test_selector_no_node_satisfies_fails_before_any_worker_starts(ray_on_three_region, tmp_path):
    spec = digits_spec(tmp_path)
    spec = spec.model_copy(update={"placement": spec.placement.model_copy(update={"label_selector": {"ray.io/node-group": "tpu"}})})
    with pytest.raises(PreflightError, match="placement.label_selector.*no alive node matches"):
        train(spec)
    assert not list(Path(spec.storage_path, spec.name).glob("checkpoint_*"))


def test_more_workers_than_the_group_can_hold_fails_fast(ray_on_three_region, tmp_path):
    # The `cpu` group is one 4-CPU node: 5 one-CPU workers can never be placed there.
    spec = digits_spec(tmp_path, num_workers=5, global_batch_size=160)
    with pytest.raises(PreflightError, match="`num_workers`.*at most 4 workers.*Lower `num_workers` to 4"):
        train(spec)


def test_spot_exclusion_keeps_workers_off_the_spot_gpu_group(ray_on_three_region, tmp_path):
    spec = digits_spec(tmp_path)
    placement = spec.placement.model_copy(update={"label_selector": {"ray.io/node-group": "gpu"}, "allow_spot": False})
    with pytest.raises(PreflightError, match="no alive node matches.*allow_spot"):
        train(spec.model_copy(update={"placement": placement}))
