"""Training on the live three-region cluster: ZeRO stages, a worker killed mid-run, the artifact.

Each run is the shipped digits config (2 CPU workers on the UAE `cpu` group, bf16) with
its own storage path. ZeRO-2 is exercised by the kill/resume test, which must also reach
the accuracy bar. What ran is read back from the DeepSpeed engines (metadata.json's
`training.engine`), not from the plan.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO
from mlplatform import config
from mlplatform.errors import PreflightError
from mlplatform.train import TrainSpec, load_model, read_metadata, train

DIGITS = REPO / "jobs/configs/digits.yaml"


def digits_spec(restricted_tmp: Path, **update) -> TrainSpec:
    """The shipped spec; uae-restricted, so its storage lies inside the policy's prefixes."""
    spec = config.load(DIGITS, TrainSpec)
    return spec.model_copy(update={"storage_path": str(restricted_tmp / "runs"), **update})


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
    # Read from each worker's DeepSpeed engine, not copied from the plan.
    engine = meta["training"]["engine"]
    assert len(engine) == 2 and all(e["zero_stage"] == stage and e["bf16"] and not e["fp16"] for e in engine)
    total = engine[0]["params_total"]
    assert total == 64 * 256 + 256 + 256 * 10 + 10
    local = [e["params_local"] for e in engine]
    # ZeRO-3 partitions the parameters over the two ranks (each padded to a whole share).
    assert (sum(local) >= total and max(local) < total) if stage == 3 else local == [total, total]
    if stage > 0:  # the fp32 master copy and optimizer states are partitioned from stage 1 on
        assert max(e["optimizer_local"] for e in engine) < total <= sum(e["optimizer_local"] for e in engine)
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
def test_zero_stage_trains_digits_to_the_bar(ray_on_three_region, restricted_tmp, stage):
    spec = digits_spec(restricted_tmp, zero_stage=stage, name=f"digits-zero{stage}")
    result = train(spec)
    assert result.zero_stage == stage and result.precision == "bf16"
    assert result.steps == result.steps_trained == 8 * 22  # 8 epochs × (1437 train rows // 2 workers // 32) steps
    assert result.resumed_from_step == 0
    check_artifact(result.artifact_dir, stage)
    # keep_last: 2 — older checkpoints were deleted.
    assert sorted(p.name for p in Path(spec.storage_path, spec.name).glob("checkpoint_step*")) == [
        "checkpoint_step00000150",
        "checkpoint_step00000176",
    ]


# About 70 s (a worker killed mid-run, the group restarted): with `make test-slow`.
@pytest.mark.slow
def test_worker_killed_from_outside_resumes_from_the_newest_complete_checkpoint(ray_on_three_region, restricted_tmp):
    # A Ray Train worker SIGKILLed mid-run (its pid read from Ray's state API). Ray Train registers
    # a checkpoint only at its next poll, so the run must resume from the newest checkpoint whose
    # manifest is complete on storage, and lose at most one checkpoint interval.
    from ray.util.state import list_actors

    from mlplatform.train import checkpoints
    from mlplatform._internal.storage import filesystem

    spec = digits_spec(restricted_tmp, name="digits-kill")
    spec = spec.model_copy(update={"checkpoint": spec.checkpoint.model_copy(update={"every_n_steps": 20})})
    run_dir = Path(spec.storage_path, spec.name)
    steps_log = run_dir / "steps.log"
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(spec)))
    runner.start()

    def logged() -> list[tuple[int, str]]:
        text = steps_log.read_text() if steps_log.exists() else ""
        return [(int(step), pid) for step, pid, *_ in (line.split() for line in text.splitlines() if line.strip())]

    deadline = time.monotonic() + 300
    while not [s for s, _ in logged() if s >= 44] and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    assert len(workers) == 2, workers
    os.kill(workers[-1].pid, signal.SIGKILL)
    time.sleep(1)  # a worker blocked on its dead peer writes nothing more
    fs, root = filesystem(spec.storage_path)
    newest = checkpoints.newest_complete(fs, f"{root}/{spec.name}")
    runner.join(600)
    result = outcome["result"]

    attempts: dict[str, list[int]] = {}
    for step, pid in logged():
        attempts.setdefault(pid, []).append(step)
    first, second = attempts.values()
    assert newest is not None and newest.step % 20 == 0 and first[-1] >= 44
    assert first == list(range(1, first[-1] + 1))
    assert first[-1] - newest.step <= 20 + 1  # at most one interval (and the step in flight) lost
    assert second == list(range(newest.step + 1, 177))  # resumed right after it, to the end
    assert result.steps == 176 and result.resumed_from_step == newest.step
    assert result.steps_trained == 176 - newest.step
    check_artifact(result.artifact_dir, 2)


def test_selector_no_node_satisfies_fails_before_any_worker_starts(ray_on_three_region, restricted_tmp):
    spec = digits_spec(restricted_tmp)
    spec = spec.model_copy(update={"placement": spec.placement.model_copy(update={"label_selector": {"ray.io/node-group": "tpu"}})})
    with pytest.raises(PreflightError, match="placement.label_selector.*no alive node matches"):
        train(spec)
    assert not list(Path(spec.storage_path, spec.name).glob("checkpoint_*"))


def test_more_workers_than_the_group_can_hold_fails_fast(ray_on_three_region, restricted_tmp):
    # The `cpu` group is one 4-CPU node: 5 one-CPU workers can never be placed there.
    spec = digits_spec(restricted_tmp, num_workers=5, global_batch_size=160)
    with pytest.raises(PreflightError, match="`num_workers`.*at most 4 workers.*Lower `num_workers` to 4"):
        train(spec)


def test_spot_exclusion_keeps_workers_off_the_spot_gpu_group(ray_on_three_region, restricted_tmp):
    spec = digits_spec(restricted_tmp)
    placement = spec.placement.model_copy(update={"label_selector": {"ray.io/node-group": "gpu"}, "allow_spot": False})
    with pytest.raises(PreflightError, match="no alive node matches.*allow_spot"):
        train(spec.model_copy(update={"placement": placement}))
