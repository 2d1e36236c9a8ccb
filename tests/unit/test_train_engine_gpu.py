"""GPU paths that need no Ray: DeepSpeed on one CUDA rank over NCCL, and the torch serving forward pass.

Skipped with "Requires: CUDA" where no GPU is visible; scripts/gpu_check.sh runs them on a
lent GPU machine (which has no Ray), and they run unchanged on any CUDA machine.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import REPO
from mlplatform import config
from mlplatform.train import TrainSpec, artifact, engine, models, plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Requires: CUDA"),
]


@pytest.fixture(scope="module")
def one_rank():
    """This process as rank 0 of a one-rank NCCL group, as Ray Train makes each worker."""
    engine.init_single_process("cuda")
    yield torch.device("cuda", 0)
    torch.distributed.destroy_process_group()


def digits_spec(**update) -> TrainSpec:
    data = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec).model_dump(mode="json")
    data.update(use_gpu=True, num_workers=1, global_batch_size=32, micro_batch_size=32,
                resources_per_worker={"CPU": 1, "GPU": 1}, placement={"label_selector": {}}, **update)
    return config.validate(data, TrainSpec, "gpu test")


def build(spec: TrainSpec, steps: int = 50) -> engine.Engine:
    the_plan = plan(spec)
    return engine.build(spec, the_plan.deepspeed_config(), the_plan.precision.value, steps)


def batch(device, dtype=torch.float16):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(32, 64, generator=gen).to(device, dtype), torch.randint(0, 10, (32,), generator=gen).to(device)


@pytest.mark.parametrize("stage", [0, 2])
def test_fp16_overflow_skips_the_step_and_lowers_the_loss_scale(one_rank, stage):
    # Stage 0 runs DeepSpeed's fp16 optimizer without ZeRO, stage 2 the ZeRO one: each keeps its own scaler.
    spec = digits_spec(name=f"gpu-fp16-scale-{stage}", precision="fp16", zero_stage=stage)
    run = build(spec)
    facts = engine.facts(run.engine)
    assert (facts["fp16"], facts["dynamic_loss_scale"], facts["loss_scale"]) == (True, True, 2.0**16)
    x, y = batch(one_rank)
    loss_of = engine.loss_function(spec.task)
    before = [p.detach().clone() for p in run.engine.module.parameters()]

    def overflowing(out, target):  # finite in fp32, infinite once scaled gradients reach fp16
        return loss_of(out, target) * 1e30

    for _ in range(2):
        engine.train_step(run.engine, [(x, y)], overflowing)
    scale = engine.facts(run.engine)["loss_scale"]
    # ZeRO's scaler has hysteresis 2 (the first overflow spends it, the second halves the scale).
    assert scale == 2.0**15 if stage == 2 else scale < 2.0**16
    assert all(torch.equal(a, b) for a, b in zip(before, run.engine.module.parameters())), "an overflowing step updated weights"
    loss = engine.train_step(run.engine, [(x, y)], loss_of)
    assert np.isfinite(loss)
    assert not all(torch.equal(a, b) for a, b in zip(before, run.engine.module.parameters()))
    run.engine.destroy()


def test_zero3_bf16_trains_and_its_checkpoint_round_trips(one_rank, tmp_path):
    spec = digits_spec(name="gpu-zero3", precision="bf16", zero_stage=3)
    run = build(spec)
    facts = engine.facts(run.engine)
    assert (facts["zero_stage"], facts["bf16"], facts["optimizer"]) == (3, True, "DeepSpeedZeroOptimizer_Stage3")
    x, y = batch(one_rank, torch.bfloat16)
    loss_of = engine.loss_function(spec.task)
    losses = [engine.train_step(run.engine, [(x, y)], loss_of) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    engine.save_checkpoint(run, str(tmp_path), 30, 0, spec)
    restored = build(spec)
    assert engine.load_checkpoint(restored, str(tmp_path), 0) == 30
    with torch.no_grad():
        assert torch.equal(run.engine(x), restored.engine(x))
    # The consolidated fp32 weights rebuild the same model outside DeepSpeed.
    model = artifact.build_with_weights(spec.model.ref, run.model_kwargs, tmp_path / artifact.WEIGHTS).to(one_rank)
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()), run.engine(x).float(), atol=0.1, rtol=0.05)
    run.engine.destroy()
    restored.engine.destroy()


def test_torch_forward_on_cuda_matches_fp32_on_cpu_and_batches_exactly(tmp_path):
    from safetensors.torch import save_model

    from mlplatform.serve._forward import TorchForward, run_batched

    weights = tmp_path / "w.safetensors"
    save_model(models.build("builtin:digits_mlp", {}), str(weights))
    target = artifact.write_artifact(str(tmp_path / "artifact"), str(weights),
                                     {"model_ref": "builtin:digits_mlp", "model_kwargs": {}}, pa.table({"x": [0]}))
    gpu = TorchForward(target, {"device": "cuda", "dtype": "bfloat16", "num_cpus": 1, "role": "model"})
    cpu = TorchForward(target, {"device": "cpu", "dtype": "float32", "num_cpus": 1, "role": "model"})
    assert gpu.device.type == "cuda"
    requests = [np.random.default_rng(i).random((n, 64), dtype=np.float32) for i, n in enumerate((1, 5, 26))]
    parts, rows = run_batched(gpu, requests)
    assert len(rows) == 32 and [len(p) for p in parts] == [1, 5, 26]
    for request, part in zip(requests, parts):
        np.testing.assert_allclose(part, cpu(request), atol=0.05, rtol=0.05)
    gpu.check_health()
