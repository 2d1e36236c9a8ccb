"""The DeepSpeed plan: one deterministic translation of a TrainSpec into a DeepSpeed config.

Memory model (per worker, bytes), from the ZeRO paper (Rajbhandari et al. 2020, §3):
Ψ parameters, N workers, p/g bytes per parameter and gradient, K bytes of optimizer
state per parameter. Mixed precision Adam: p = g = 2, K = 12 (fp32 master, m, v);
fp32 Adam: p = g = 4, K = 8.

    stage 0 (DP):  (p + g + K)·Ψ            = 16Ψ mixed
    stage 1:       (p + g)·Ψ + K·Ψ/N        = 4Ψ + 12Ψ/N
    stage 2:       p·Ψ + (g + K)·Ψ/N        = 2Ψ + 14Ψ/N
    stage 3:       (p + g + K)·Ψ/N          = 16Ψ/N

`offload_optimizer` moves the K part to host memory, `offload_params` (stage 3) the p
part. The activation estimate of one micro batch (models.activation_bytes) is added.

Measured on an H100 (tests/benchmarks/gpu_check.py, BENCHMARKS.md), DeepSpeed 0.19's peak
is not in backward but in the optimizer step, which the paper's formula leaves out: the
16-bit gradient partition is cast to an fp32 copy (4 bytes per parameter of the optimizer's
partition) and Adam's update allocates one more fp32 temporary (4 bytes); stages 1 and 2
free the 16-bit gradients before the step, stages 0 and 3 keep them, and ZeRO-3 holds a
16-bit reduce bucket of `reduce_bucket_size` elements throughout. So the device peak is

    buffers + params + optimizer + max(grads + activations, grads kept + step temporaries)

With optimizer offload the step runs on the host and only the backward term applies.

`auto` precision: bf16 where the hardware has it, fp16 with dynamic loss scaling on GPUs
without bf16, fp32 otherwise. `auto` stage: the lowest stage whose estimate fits the
per-worker memory budget; on GPUs, if none fits, optimizer then parameter offload.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mlplatform.errors import PlanError
from mlplatform.train import models
from mlplatform.train.spec import Precision, Task, TrainSpec

GB = 10**9
# Memory per device and native bf16, for the plan when no GPU is visible to the planner.
ACCELERATORS: dict[str, tuple[float, bool]] = {
    "H200": (141, True),
    "H100": (80, True),
    "A100": (40, True),
    "A100-80G": (80, True),
    "L40S": (48, True),
    "A10G": (24, True),
    "L4": (24, True),
    "V100": (16, False),
    "T4": (16, False),
}
# Share of the memory budget the estimate may use: allocator fragmentation, CUDA context,
# communication buckets and the framework itself need the rest.
HEADROOM = 0.8
# DeepSpeed's reduce bucket, in elements (the config below sets it; ZeRO-3 allocates it up front).
REDUCE_BUCKET = int(5e7)


@dataclass(frozen=True)
class Hardware:
    """What one worker runs on, as far as the planner knows."""

    device: str  # "cpu" or "cuda"
    name: str
    bf16: bool
    fp16: bool
    memory_bytes: int
    source: str  # how memory_bytes / bf16 were determined


@dataclass(frozen=True)
class StageEstimate:
    """Estimated per-worker memory of one ZeRO configuration."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    params: int
    grads: int
    optimizer: int
    host: int  # offloaded states, in host memory
    activations: int
    step: int = 0  # optimizer-step temporaries on the device: fp32 gradient copy, Adam's update
    grads_at_step: int = 0  # 16-bit gradients still held during the step
    buffers: int = 0  # DeepSpeed's own persistent buffers (the ZeRO-3 reduce bucket)

    @property
    def device(self) -> int:
        """Peak bytes on the training device: the larger of backward and optimizer step."""
        backward = self.grads + self.activations
        step = self.grads_at_step + self.step
        return self.buffers + self.params + self.optimizer + max(backward, step)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer + self.host

    @property
    def label(self) -> str:
        extra = "+".join(x for x, on in (("offload_opt", self.offload_optimizer), ("offload_param", self.offload_params)) if on)
        return f"ZeRO-{self.stage}" + (f" {extra}" if extra else "")


@dataclass(frozen=True)
class Plan:
    """The resolved run: precision, stage, offload, memory estimates and the DeepSpeed config."""

    spec: TrainSpec
    hardware: Hardware
    num_params: int
    precision: Precision
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    accum_steps: int
    estimates: tuple[StageEstimate, ...]
    chosen: StageEstimate
    notes: tuple[str, ...]
    _ds_config: Mapping[str, Any] = field(repr=False)

    def deepspeed_config(self) -> dict[str, Any]:
        """A fresh copy of the DeepSpeed config dict (DeepSpeed mutates what it is given)."""
        return copy.deepcopy(dict(self._ds_config))


def state_bytes_per_param(precision: Precision, optimizer: str, momentum: float = 0.9) -> tuple[int, int, int]:
    """(p, g, K): bytes per parameter of parameters, gradients and optimizer states."""
    mixed = precision in (Precision.BF16, Precision.FP16)
    if optimizer in ("adam", "adamw"):
        moments = 8
    else:
        moments = 4 if momentum else 0
    return (2, 2, 4 + moments) if mixed else (4, 4, moments)


def model_state_bytes(
    num_params: int,
    stage: int,
    num_workers: int,
    precision: Precision = Precision.BF16,
    optimizer: str = "adamw",
    offload_optimizer: bool = False,
    offload_params: bool = False,
    momentum: float = 0.9,
) -> tuple[int, int, int, int]:
    """Per-worker (params, grads, optimizer, host) bytes of model states under a ZeRO stage."""
    p, g, k = state_bytes_per_param(precision, optimizer, momentum)
    n, psi = num_workers, num_params
    shard = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[stage]
    params, grads, opt = p * psi / shard[0], g * psi / shard[1], k * psi / shard[2]
    host = 0.0
    if offload_optimizer:
        host, opt = host + opt, 0.0
    if offload_params:
        host, params = host + params, 0.0
    return round(params), round(grads), round(opt), round(host)


def step_bytes(
    num_params: int, stage: int, num_workers: int, precision: Precision, optimizer: str, offload_optimizer: bool,
    grads: int,
) -> tuple[int, int]:
    """(temporaries, 16-bit gradients kept) on the device during DeepSpeed's optimizer step.

    Temporaries, per parameter of this worker's optimizer partition: the fp32 copy of the
    16-bit gradients (mixed precision) and Adam's fp32 update buffer. Nothing when the step
    runs on the host (optimizer offload).
    """
    if offload_optimizer:
        return 0, 0
    mixed = precision in (Precision.BF16, Precision.FP16)
    per_param = (4 if mixed else 0) + (4 if optimizer in ("adam", "adamw") else 0)
    shard = num_workers if stage > 0 else 1
    return round(per_param * num_params / shard), (0 if stage in (1, 2) else grads)


def detect_hardware(spec: TrainSpec) -> Hardware:
    """What the planner assumes a worker has: from the spec, else this machine."""
    if spec.use_gpu:
        name = spec.accelerator_type
        mem = bf16 = None
        source = "accelerator_type"
        if name and name.upper() in ACCELERATORS:
            gb, bf16 = ACCELERATORS[name.upper()]
            mem = int(gb * GB)
        elif _cuda_available():
            import torch

            props = torch.cuda.get_device_properties(0)
            name, mem, bf16, source = props.name, int(props.total_memory), torch.cuda.is_bf16_supported(), "local GPU"
        if mem is None:
            # Unknown GPU: fp16 runs on every CUDA GPU; 16 GB is the smallest common card.
            name, mem, bf16, source = name or "unknown GPU", 16 * GB, False, "assumed (set accelerator_type)"
        if spec.memory_per_worker_gb:
            mem, source = int(spec.memory_per_worker_gb * GB), "memory_per_worker_gb"
        return Hardware("cuda", name, bool(bf16), True, mem, source)
    bf16 = _cpu_has_native_bf16()
    if spec.memory_per_worker_gb:
        mem, source = int(spec.memory_per_worker_gb * GB), "memory_per_worker_gb"
    elif spec.resources_per_worker.get("memory"):
        mem, source = int(spec.resources_per_worker["memory"]), "resources_per_worker.memory"
    else:
        mem, source = _host_memory() // spec.num_workers, "host memory / num_workers"
    return Hardware("cpu", "cpu", bf16, False, mem, source)


def plan(spec: TrainSpec, hardware: Hardware | None = None) -> Plan:
    """Resolve precision and ZeRO stage and build the DeepSpeed config; starts nothing.

    Raises:
        PlanError: no stage fits the memory budget, or the requested precision is not
            available on the hardware.
    """
    hw = hardware or detect_hardware(spec)
    notes: list[str] = [f"memory budget per worker {hw.memory_bytes / GB:.1f} GB ({hw.source})"]
    precision = _precision(spec, hw, notes)
    kwargs = dict(spec.model.kwargs)
    if spec.task == Task.CAUSAL_LM:
        kwargs.setdefault("seq_len", spec.dataset.seq_len)  # as the model is built (position table)
    num_params = models.count_params(spec.model.ref, kwargs)
    act_b = 4 if precision == Precision.FP32 else 2
    micro = spec.micro_batch_size
    acts = models.activation_bytes(spec.model.ref, kwargs, micro, act_b, spec.activation_checkpointing)
    if acts is None:
        notes.append("activation memory of an imported model is not estimated (counted as 0)")
        acts = 0

    def estimate(stage: int, oo: bool, op: bool) -> StageEstimate:
        p, g, o, h = model_state_bytes(
            num_params, stage, spec.num_workers, precision, spec.optimizer.name, oo, op, spec.optimizer.momentum
        )
        step, kept = step_bytes(num_params, stage, spec.num_workers, precision, spec.optimizer.name, oo, g)
        # Allocated at its full size however small the model (95 MiB at 16 bits, seen on an H100 and on CPUs).
        bucket = REDUCE_BUCKET * (4 if precision == Precision.FP32 else 2) if stage == 3 else 0
        return StageEstimate(stage, oo, op, p, g, o, h, acts, step, kept, bucket)

    oo, op = spec.offload_optimizer, spec.offload_params
    table = [estimate(s, oo and s > 0, op and s == 3) for s in range(4)]
    if hw.device == "cuda" and not (oo or op):
        table += [estimate(2, True, False), estimate(3, True, False), estimate(3, True, True)]
    budget = int(hw.memory_bytes * HEADROOM)
    if spec.zero_stage == "auto":
        fitting = [e for e in table if e.device <= budget and (e.stage > 0 or not oo) and (e.stage == 3 or not op)]
        if not fitting:
            best = min(table, key=lambda e: e.device)
            raise PlanError(
                f"Got zero_stage auto for `zero_stage`; no stage fits: the smallest estimate, {best.label}, needs "
                f"{best.device / GB:.2f} GB per worker of a {budget / GB:.2f} GB budget "
                f"({HEADROOM:.0%} of {hw.memory_bytes / GB:.1f} GB). Add workers (`num_workers`), lower "
                "`micro_batch_size`, set `activation_checkpointing: true`, or raise `memory_per_worker_gb`."
            )
        chosen = fitting[0]
        notes.append(f"auto stage: {chosen.label} is the lowest that fits {budget / GB:.2f} GB")
    else:
        chosen = next(e for e in table if e.stage == spec.zero_stage)
        if chosen.device > budget:
            notes.append(
                f"warning: {chosen.label} needs an estimated {chosen.device / GB:.2f} GB per worker, over the "
                f"{budget / GB:.2f} GB budget"
            )
    ds = _deepspeed_config(spec, precision, chosen)
    return Plan(
        spec=spec,
        hardware=hw,
        num_params=num_params,
        precision=precision,
        zero_stage=chosen.stage,
        offload_optimizer=chosen.offload_optimizer,
        offload_params=chosen.offload_params,
        accum_steps=spec.accum_steps,
        estimates=tuple(table),
        chosen=chosen,
        notes=tuple(notes),
        _ds_config=ds,
    )


def format_plan(p: Plan) -> str:
    """Human-readable plan: the choice, the DeepSpeed essentials and every stage's estimate."""
    s = p.spec
    lines = [
        f"Training plan for {s.name!r}",
        f"  model        {s.model.ref}  ({p.num_params:,} parameters)",
        f"  workers      {s.num_workers} × {'GPU ' + p.hardware.name if p.hardware.device == 'cuda' else 'CPU'}"
        f"  ({'nccl' if p.hardware.device == 'cuda' else 'gloo'}), resources {s.resources_per_worker}",
        f"  placement    {s.placement.selector() or 'any node'}",
        f"  batch        global {s.global_batch_size} = micro {s.micro_batch_size} × workers {s.num_workers} × "
        f"accumulation {p.accum_steps}",
        f"  precision    {p.precision.value}" + ("  (auto)" if s.precision == Precision.AUTO else "")
        + ("  dynamic loss scaling" if p.precision == Precision.FP16 else ""),
        f"  ZeRO         {p.chosen.label}" + ("  (auto)" if s.zero_stage == "auto" else ""),
        f"  checkpoints  every {s.checkpoint.every_n_steps} steps, keep {s.checkpoint.keep_last}, "
        f"under {s.storage_path}/{s.name}",
    ]
    big = max(max(e.device, e.host) for e in p.estimates)
    unit, div = ("GB", GB) if big >= GB else ("MB", 10**6)
    lines += [
        "",
        f"  Estimated peak memory per worker ({unit}; model states per the ZeRO paper, activations of one micro "
        "batch, DeepSpeed's optimizer-step temporaries and buffers):",
        f"    {'config':<32}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'step':>9}{'device':>9}{'host':>9}",
    ]
    for e in p.estimates:
        mark = "  <- chosen" if e == p.chosen else ""
        lines.append(
            f"    {e.label:<32}{e.params / div:>9.3f}{e.grads / div:>9.3f}{e.optimizer / div:>9.3f}"
            f"{e.activations / div:>9.3f}{e.step / div:>9.3f}{e.device / div:>9.3f}{e.host / div:>9.3f}{mark}"
        )
    lines += ["", *(f"  note: {n}" for n in p.notes)]
    return "\n".join(lines)


# ---------------------------------------------------------------- internals


def _precision(spec: TrainSpec, hw: Hardware, notes: list[str]) -> Precision:
    want = spec.precision
    if want == Precision.AUTO:
        if hw.bf16:
            got = Precision.BF16
        elif hw.device == "cuda":
            got = Precision.FP16
        else:
            got = Precision.FP32
        notes.append(f"auto precision: {got.value} ({'native bf16' if hw.bf16 else 'no native bf16'} on {hw.name})")
        return got
    if want == Precision.BF16 and hw.device == "cuda" and not hw.bf16:
        raise PlanError(
            f"Got bf16 for `precision`; {hw.name} has no bf16 ({hw.source}). Use fp16 (dynamic loss scaling) or auto."
        )
    if want == Precision.BF16 and not hw.bf16:
        notes.append("bf16 on a CPU without native bf16 (AVX512-BF16/AMX) runs emulated: correct, slower")
    return want


def _deepspeed_config(spec: TrainSpec, precision: Precision, e: StageEstimate) -> dict[str, Any]:
    opt = spec.optimizer
    zero: dict[str, Any] = {"stage": e.stage}
    if e.stage > 0:
        zero.update(contiguous_gradients=True, overlap_comm=spec.use_gpu, reduce_bucket_size=REDUCE_BUCKET)
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg: dict[str, Any] = {
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.accum_steps,
        "gradient_clipping": opt.grad_clip or 0.0,
        "bf16": {"enabled": precision == Precision.BF16},
        # loss_scale 0 = dynamic: start at 2^16, halve on overflow, double after 1000 clean steps.
        "fp16": {
            "enabled": precision == Precision.FP16,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_optimization": zero,
        # The client optimizer is plain torch (nothing to JIT-compile); ZeRO wraps it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is reported through Ray Train instead
        "wall_clock_breakdown": False,
    }
    if e.offload_optimizer:
        # ZeRO-Offload steps on the host with DeepSpeed's CPU Adam (a compiled op), so the
        # optimizer is declared here instead of passed in.
        kind = {"adamw": "AdamW", "adam": "Adam"}.get(opt.name)
        if kind is None:
            raise PlanError(
                f"Got {opt.name} for `optimizer.name`; optimizer offload supports adam and adamw. "
                "Use one of them or set offload_optimizer: false."
            )
        cfg["optimizer"] = {
            "type": kind,
            "params": {"lr": opt.lr, "betas": list(opt.betas), "weight_decay": opt.weight_decay},
        }
    return cfg


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * GB
