"""GPU path: NCCL, fp16 with dynamic loss scaling, bf16 where the GPU has it, ZeRO-3 offload.

Runs unchanged on a machine with CUDA GPUs (a local Ray with this machine's GPUs); skips
with "Requires: CUDA" elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# The lent GPU machine of scripts/gpu_check.sh has no Ray: these skip there, saying so.
pytest.importorskip("ray", reason="Requires: Ray (these train through Ray Train; the GPU check machine has none)")

from conftest import REPO  # noqa: E402
from mlplatform import config  # noqa: E402
from mlplatform.train import TrainSpec, load_model, plan, read_metadata, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Requires: CUDA"),
]


@pytest.fixture(scope="module")
def ray_with_gpus():
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield
    ray.shutdown()


def gpu_digits(tmp_path: Path, **update) -> TrainSpec:
    spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
    workers = min(2, torch.cuda.device_count())
    data = spec.model_dump(mode="json")
    data.update(
        use_gpu=True,
        num_workers=workers,
        global_batch_size=32 * workers,
        resources_per_worker={"CPU": 1, "GPU": 1},
        placement={"label_selector": {}, "allow_spot": True},
        storage_path=str(tmp_path / "runs"),
        **update,
    )
    return config.validate(data, TrainSpec, "gpu test")


def test_fp16_dynamic_loss_scaling_over_nccl(ray_with_gpus, tmp_path):
    spec = gpu_digits(tmp_path, name="gpu-fp16", precision="fp16", zero_stage=2)
    ds = plan(spec).deepspeed_config()
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    result = train(spec)
    assert result.precision == "fp16"
    assert read_metadata(result.artifact_dir)["metrics"]["val_accuracy"] >= 0.95
    assert next(load_model(result.artifact_dir).parameters()).dtype == torch.float32


def test_auto_precision_matches_the_gpu(ray_with_gpus, tmp_path):
    spec = gpu_digits(tmp_path, name="gpu-auto", precision="auto", zero_stage=3)
    result = train(spec)
    assert result.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert read_metadata(result.artifact_dir)["metrics"]["val_accuracy"] >= 0.95


@pytest.mark.slow
def test_zero3_with_optimizer_and_parameter_offload(ray_with_gpus, tmp_path):
    # DeepSpeed's CPU Adam is compiled on first use (minutes, cached in ~/.cache/torch_extensions).
    spec = gpu_digits(
        tmp_path, name="gpu-offload", precision="fp16", zero_stage=3, offload_optimizer=True, offload_params=True
    )
    zero = plan(spec).deepspeed_config()["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    result = train(spec)
    assert read_metadata(result.artifact_dir)["metrics"]["val_accuracy"] >= 0.95
