"""The plan: ZeRO memory formulas against the paper's numbers, auto precision and stage choice."""

from __future__ import annotations

import pytest

from conftest import REPO
from mlplatform import config
from mlplatform.errors import PlanError
from mlplatform.train import TrainSpec, format_plan, plan
from mlplatform.train import models
from mlplatform.train.plan import GB, Hardware, model_state_bytes
from mlplatform.train.spec import Precision

PSI, N = 7_500_000_000, 64  # the ZeRO paper's running example (Figure 1): 7.5B parameters, 64 GPUs


@pytest.mark.parametrize(
    "stage,expected_gb",
    # ZeRO paper, Figure 1 / Table 1 (K = 12): 120 GB, 31.4 GB, 16.6 GB, 1.9 GB.
    [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)],
)
def test_model_states_match_the_zero_paper(stage, expected_gb):
    p, g, o, host = model_state_bytes(PSI, stage, N, Precision.FP16, "adam")
    assert host == 0
    assert round((p + g + o) / GB, 1) == expected_gb


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_model_states_follow_the_formulas_exactly(n):
    psi = 1_000_000 * n  # divisible by n, so every share is exact
    total = lambda stage: sum(model_state_bytes(psi, stage, n, Precision.BF16, "adamw")[:3])  # noqa: E731
    assert total(0) == 16 * psi
    assert total(1) == 4 * psi + 12 * psi // n
    assert total(2) == 2 * psi + 14 * psi // n
    assert total(3) == 16 * psi // n


def test_zero3_over_zero0_is_half_at_two_workers():
    ratio = sum(model_state_bytes(10**6, 3, 2)[:3]) / sum(model_state_bytes(10**6, 0, 2)[:3])
    assert ratio == 0.5


def test_fp32_adam_is_4_4_8_and_offload_moves_states_to_host():
    p, g, o, host = model_state_bytes(1000, 0, 1, Precision.FP32, "adamw")
    assert (p, g, o, host) == (4000, 4000, 8000, 0)
    p, g, o, host = model_state_bytes(1000, 3, 2, Precision.BF16, "adamw", offload_optimizer=True, offload_params=True)
    assert (p, g, o, host) == (0, 1000, 0, 1000 + 6000)


def test_builtin_param_counts_match_the_built_models():
    for ref, kwargs in [
        ("builtin:digits_mlp", {}),
        ("builtin:digits_mlp", {"hidden": [32]}),
        ("builtin:gpt", {}),
        ("builtin:gpt", {"d_model": 64, "n_layer": 2, "n_head": 2, "tie_weights": False, "d_ff": 100}),
    ]:
        model = models.build(ref, kwargs)
        assert models.count_params(ref, kwargs) == sum(p.numel() for p in model.parameters()), (ref, kwargs)


def test_gpt_configs_are_about_1m_and_over_100m():
    assert 0.9e6 <= models.count_params("builtin:gpt", {}) <= 1.2e6
    big = config.load(REPO / "jobs/configs/lm_100m.yaml", TrainSpec)
    assert models.count_params(big.model.ref, big.model.kwargs) >= 100e6


def _spec(**overrides) -> TrainSpec:
    base = {
        "name": "t",
        "model": {"ref": "builtin:gpt"},
        "dataset": {"path": "builtin:tiny_corpus"},
        "task": "causal_lm",
        "max_steps": 10,
        "global_batch_size": 16,
        "micro_batch_size": 8,
        "num_workers": 2,
    }
    return config.validate({**base, **overrides}, TrainSpec, "test")


CPU_BF16 = Hardware("cpu", "cpu", True, False, 8 * GB, "test")
CPU_NO_BF16 = Hardware("cpu", "cpu", False, False, 8 * GB, "test")
A100 = Hardware("cuda", "A100", True, True, 40 * GB, "test")
T4 = Hardware("cuda", "T4", False, True, 16 * GB, "test")


@pytest.mark.parametrize(
    "hw,use_gpu,expected",
    [(CPU_BF16, False, "bf16"), (CPU_NO_BF16, False, "fp32"), (A100, True, "bf16"), (T4, True, "fp16")],
)
def test_auto_precision(hw, use_gpu, expected):
    p = plan(_spec(use_gpu=use_gpu), hw)
    assert p.precision.value == expected
    ds = p.deepspeed_config()
    assert ds["bf16"]["enabled"] == (expected == "bf16")
    assert ds["fp16"]["enabled"] == (expected == "fp16")
    if expected == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling


def test_bf16_on_a_gpu_without_it_is_refused():
    with pytest.raises(PlanError, match="`precision`"):
        plan(_spec(use_gpu=True, precision="bf16"), T4)


def test_auto_stage_picks_the_lowest_stage_that_fits():
    big = {"ref": "builtin:gpt", "kwargs": {"d_model": 768, "n_layer": 16, "n_head": 12}}
    spec = _spec(model=big, precision="bf16", micro_batch_size=1, global_batch_size=2)
    psi = models.count_params(big["ref"], big["kwargs"])
    # Budget between stage 1 and stage 0's needs: auto must land on stage 1.
    need0 = plan(spec, Hardware("cpu", "cpu", True, False, 100 * GB, "t")).estimates[0].device
    need1 = plan(spec, Hardware("cpu", "cpu", True, False, 100 * GB, "t")).estimates[1].device
    budget = int((need0 + need1) / 2 / 0.8)
    p = plan(spec, Hardware("cpu", "cpu", True, False, budget, "t"))
    assert p.zero_stage == 1 and p.deepspeed_config()["zero_optimization"]["stage"] == 1
    # bf16 AdamW on 2 workers, both peaking in the optimizer step: stage 0 holds 2 + 2 + 12 + 8
    # bytes per parameter (params, grads kept, states, fp32 gradient copy + Adam's update);
    # stage 1 frees the gradients and shards the rest: 2 + (12 + 8) / 2.
    assert need0 - need1 == pytest.approx(24 * psi - 12 * psi, abs=4)
    # With room for everything, stage 0; with room for almost nothing, a PlanError naming fixes.
    assert plan(spec, Hardware("cpu", "cpu", True, False, 100 * GB, "t")).zero_stage == 0
    with pytest.raises(PlanError, match="num_workers.*micro_batch_size.*activation_checkpointing"):
        plan(spec, Hardware("cpu", "cpu", True, False, 10**6, "t"))


def test_auto_stage_falls_back_to_offload_on_gpus():
    big = {"ref": "builtin:gpt", "kwargs": {"d_model": 768, "n_layer": 16, "n_head": 12}}
    spec = _spec(model=big, use_gpu=True, micro_batch_size=1, global_batch_size=2)
    table = {e.label: e.device for e in plan(spec, T4).estimates}
    assert list(table)[4:] == ["ZeRO-2 offload_opt", "ZeRO-3 offload_opt", "ZeRO-3 offload_opt+offload_param"]
    # Between what ZeRO-3 + optimizer offload and ZeRO-2 + optimizer offload need: only the former fits.
    budget = int((table["ZeRO-3 offload_opt"] + table["ZeRO-2 offload_opt"]) / 2 / 0.8)
    p = plan(spec, Hardware("cuda", "T4", False, True, budget, "t"))
    assert (p.zero_stage, p.offload_optimizer, p.offload_params) == (3, True, False)
    zero = p.deepspeed_config()["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert p.deepspeed_config()["optimizer"]["type"] == "AdamW"


def test_explicit_stage_is_kept_and_batch_arithmetic_passed_through():
    p = plan(_spec(zero_stage=2, precision="bf16", global_batch_size=64, micro_batch_size=8), CPU_BF16)
    ds = p.deepspeed_config()
    assert p.zero_stage == 2 and ds["zero_optimization"]["stage"] == 2
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 8, 4)
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert ds["zero_allow_untested_optimizer"] is True


def test_plan_is_deterministic_and_its_config_is_a_copy():
    a, b = plan(_spec(), CPU_BF16), plan(_spec(), CPU_BF16)
    assert a.deepspeed_config() == b.deepspeed_config()
    a.deepspeed_config()["zero_optimization"]["stage"] = 99
    assert a.deepspeed_config() == b.deepspeed_config()


def test_format_plan_lists_every_stage_and_marks_the_choice():
    spec = config.load(REPO / "jobs/configs/lm_100m.yaml", TrainSpec)
    p = plan(spec)
    text = format_plan(p)
    for label in ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "offload_opt"]:
        assert label in text
    # 1.4 GB of a T4: no stage fits on the GPU alone once DeepSpeed's optimizer-step temporaries
    # are counted, so auto offloads the optimizer.
    assert "<- chosen" in text and (p.zero_stage, p.offload_optimizer, p.offload_params) == (2, True, False)
    assert f"{p.num_params:,}" in text


def test_shipped_train_configs_plan():
    for name in ["digits.yaml", "lm_tiny.yaml", "lm_100m.yaml"]:
        path = REPO / "jobs/configs" / name
        spec = config.load(path, TrainSpec)
        assert plan(spec).deepspeed_config()["train_batch_size"] == spec.global_batch_size, path


def test_digits_config_is_zero2_bf16_on_the_uae_cpu_group():
    spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
    p = plan(spec)
    assert (p.zero_stage, p.precision.value, spec.num_workers, spec.use_gpu) == (2, "bf16", 2, False)
    assert spec.placement.selector()["ray.io/node-group"] == "cpu"
