"""The DeepSpeed engine and one training step, free of Ray.

The Ray Train loop (loop.py) and the GPU check (tests/benchmarks/gpu_check.py) both train
through these functions, so what the GPU check measures is what a job runs. Nothing here
imports Ray: a process that has called `torch.distributed.init_process_group` (Ray Train
does it in its workers; the GPU check does it for one process) is all it needs.
"""

from __future__ import annotations

import math
import os
import re
import resource
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG = "ds"  # DeepSpeed checkpoint tag inside every checkpoint directory


@dataclass
class Engine:
    """A DeepSpeed engine with what the loop needs beside it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    scheduler: Any  # torch LambdaLR over the optimizer DeepSpeed wraps
    model_kwargs: dict[str, Any]  # the factory's kwargs as built (seq_len filled in for builtin:gpt)
    in_dtype: Any  # torch dtype of floating-point inputs (the engine's compute precision)


# DeepSpeed builds its CPU ops (the shm comm op) on first use under a lock file that torch's
# FileBaton waits on for ever; a build killed half-way (a stopped job, a preempted node) leaves it
# behind and every later run on the machine would hang. A build takes ~2 min on 2 cores.
STALE_BUILD_LOCK_S = 900


def clear_stale_build_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Remove torch-extension build locks older than `max_age_s` (left by a killed build); returns them."""
    import logging
    import time

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root

        root = get_default_build_root()
    removed = []
    for lock in Path(root).glob("**/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(str(lock))
        except OSError:
            continue  # another process removed it first
    for lock in removed:
        logging.getLogger(__name__).warning("Removed a stale torch-extension build lock (a killed build left it): %s", lock)
    return removed


def init_single_process(device_type: str) -> None:
    """Make this process rank 0 of a one-rank group (NCCL on CUDA, gloo on CPU) and let DeepSpeed join it.

    What Ray Train does for each worker, for running the engine without Ray (the GPU check,
    a notebook on one GPU).
    """
    import socket

    import deepspeed
    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group(backend=backend, rank=0, world_size=1)
    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)


def build(spec, ds_config: dict[str, Any], precision: str, total_steps: int) -> Engine:
    """Model, optimizer and LR schedule of a TrainSpec wrapped by `deepspeed.initialize`.

    The process group must exist already (DeepSpeed joins it; it never creates one here).
    """
    import deepspeed
    import torch

    from mlplatform.train import models

    torch.manual_seed(spec.seed)
    kwargs = dict(spec.model.kwargs)
    if spec.model.ref == "builtin:gpt":
        kwargs.setdefault("seq_len", spec.dataset.seq_len)
    if ds_config["zero_optimization"]["stage"] == 3:
        # Parameters are partitioned as they are created: no worker ever holds the full model.
        with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=dtype(precision)):
            model = models.build(spec.model.ref, kwargs, spec.activation_checkpointing)
    else:
        model = models.build(spec.model.ref, kwargs, spec.activation_checkpointing)
    optimizer = None if "optimizer" in ds_config else _optimizer(spec, model)
    schedule = _Schedule(spec.schedule.name, spec.schedule.warmup_steps, spec.schedule.min_lr_ratio, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
        dist_init_required=False,
    )
    return Engine(engine, scheduler, kwargs, dtype(precision))


def loss_function(task):
    """loss(outputs, targets) for a task, computed in fp32 whatever the engine's precision."""
    import torch.nn.functional as F

    from mlplatform.train.spec import Task

    if task == Task.CLASSIFICATION:
        return lambda out, y: F.cross_entropy(out.float(), y)
    if task == Task.REGRESSION:
        return lambda out, y: F.mse_loss(out.float().squeeze(-1), y)
    return lambda out, y: F.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))


def train_step(engine, micro_batches, loss_of) -> float:
    """One optimizer step over `micro_batches` ((x, y) pairs); the mean micro-batch loss.

    DeepSpeed counts the micro batches: its `step()` updates the weights (and the loss
    scale, under fp16) only at the gradient-accumulation boundary.
    """
    losses = []
    for x, y in micro_batches:
        loss = loss_of(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


class Batches:
    """A worker's micro batches: the order of an epoch is a pure function of (seed, epoch, rank).

    So the global step alone says which micro batches a resumed run already consumed.
    """

    def __init__(self, x, y, micro: int, seed: int, rank: int, device, in_dtype):
        self.x, self.y, self.micro = x, y, micro
        self.seed, self.rank, self.device, self.in_dtype = seed, rank, device, in_dtype
        self._epoch, self._perm = None, None

    def get(self, epoch: int, index: int):
        import numpy as np
        import torch

        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch, self.rank]).permutation(len(self.x))
        idx = self._perm[index * self.micro : (index + 1) * self.micro]
        x = torch.from_numpy(self.x[idx]).to(self.device)
        y = torch.from_numpy(self.y[idx]).to(self.device)
        return (x.to(self.in_dtype) if x.is_floating_point() else x), y


def evaluate(engine, task, x_val, y_val, device, in_dtype, dist) -> dict[str, float]:
    """Held-out metrics summed over every worker's validation shard."""
    import torch

    from mlplatform.train.spec import Task

    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # metric sum, loss sum, count
    with torch.no_grad():
        for i in range(0, len(x_val), 256):
            x = torch.from_numpy(x_val[i : i + 256]).to(device)
            y = torch.from_numpy(y_val[i : i + 256]).to(device)
            out = engine(x.to(in_dtype) if x.is_floating_point() else x).float()
            if task == Task.CLASSIFICATION:
                sums += torch.tensor([(out.argmax(-1) == y).sum().item(),
                                      torch.nn.functional.cross_entropy(out, y, reduction="sum").item(), len(y)])
            elif task == Task.REGRESSION:
                se = ((out.squeeze(-1) - y) ** 2).sum().item()
                sums += torch.tensor([se, se, len(y)])
            else:
                nll = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
                sums += torch.tensor([0.0, nll.item(), y.numel()])
    engine.train()
    sums = sums.to(device)
    dist.all_reduce(sums)
    metric, loss, n = sums.tolist()
    n = max(n, 1)
    if task == Task.CLASSIFICATION:
        return {"val_accuracy": metric / n, "val_loss": loss / n}
    if task == Task.REGRESSION:
        return {"val_rmse": math.sqrt(metric / n), "val_loss": loss / n}
    return {"val_loss": loss / n, "val_perplexity": math.exp(min(loss / n, 50))}


def facts(engine) -> dict[str, Any]:
    """What the DeepSpeed engine itself runs: read from the engine, never copied from the plan.

    `params_local` is the parameter elements this rank holds (its ZeRO-3 partition);
    `optimizer_local` the fp32 master elements this rank's optimizer updates.
    """
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    params = list(engine.module.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    master = (
        getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO 1-2
        or getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO 3
        or getattr(opt, "fp32_groups_flat", None)  # fused fp16/bf16 optimizer without ZeRO
        or [t for group in getattr(opt, "fp32_groups", []) for t in group]  # its unfused form
    )
    scale = getattr(opt, "loss_scale", None)
    # The fp16/bf16 optimizers without ZeRO keep the flag in their loss-scale config; the ZeRO ones on themselves.
    scaling = getattr(opt, "loss_scale_config", None)
    dynamic = scaling.dynamic_loss_scale if scaling is not None else getattr(opt, "dynamic_loss_scale", False)
    return {
        "zero_stage": int(stage),
        "bf16": bool(engine.bfloat16_enabled()),
        "fp16": bool(engine.fp16_enabled()),
        "dynamic_loss_scale": bool(dynamic),
        "loss_scale": float(scale) if scale is not None else None,
        "offload_optimizer": bool(engine.zero_cpu_offload()),
        "offload_params": bool(stage == 3 and engine.zero_offload_param() is not None
                               and str(engine.zero_offload_param().device).endswith("cpu")),
        "optimizer": type(opt).__name__,
        "world_size": int(engine.world_size),
        "params_total": int(total),
        "params_local": int(local),
        "optimizer_local": int(sum(t.numel() for t in master)) if master else None,
    }


def save_checkpoint(run, directory: str, step: int, rank: int, spec=None) -> None:
    """DeepSpeed's sharded checkpoint plus this rank's RNG state into `directory`.

    With `spec`, also the consolidated fp32 weights (artifact_layout.WEIGHTS): the final checkpoint.
    """
    import torch

    run.engine.save_checkpoint(directory, tag=TAG, client_state={"global_step": step})
    torch.save(_get_rng(), os.path.join(directory, f"rng_rank{rank}.pt"))
    if spec is not None:
        _save_consolidated(run.engine, spec, run.model_kwargs, directory, rank)


def load_checkpoint(run, directory: str, rank: int) -> int:
    """Restore model, optimizer, scheduler and RNG from `directory`; the step it was taken at."""
    import torch

    with _weights_only(run.engine):
        _, client = run.engine.load_checkpoint(directory, tag=TAG)
    rng_file = os.path.join(directory, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        # weights_only: a checkpoint on shared storage is data, never code to run.
        _set_rng(torch.load(rng_file, weights_only=True))
    return int(client["global_step"])


# DeepSpeed's own classes in ZeRO 1-3 checkpoints (bf16/fp16 loss scalers, the ZeRO stage, fragment
# addresses): plain data holders, allowed so its checkpoints load with torch.load(weights_only=True).
_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


@contextmanager
def _weights_only(engine):
    """Make DeepSpeed's checkpoint loads use torch.load(weights_only=True) (it passes False).

    DeepSpeed reads every checkpoint file through engine.checkpoint_engine.load; that one method
    is replaced for the duration of the load, on this engine only.
    """
    import importlib

    import torch

    allowed = []
    for name in _DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        found = getattr(importlib.import_module(module), attr, None)
        if found is not None:
            allowed.append(found)

    def load(path, map_location=None):
        import pickle

        from mlplatform.errors import TrainingFailed

        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message names the class (keep that, not its advice to unpickle anyway).
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"the global {found.group(1)!r}" if found else "an object"
            raise TrainingFailed(
                f"{path}: refusing to load this checkpoint file: it holds {what}, not tensors or one of "
                f"DeepSpeed's known data classes. Checkpoints are loaded with "
                f"torch.load(weights_only=True) so a file on storage cannot run code; if it is a DeepSpeed "
                f"class, add it to mlplatform.train.engine._DEEPSPEED_GLOBALS."
            ) from None

    ckpt = engine.checkpoint_engine
    ckpt.load = load  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del ckpt.load


def dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def check_gpu_precision(precision: str, device) -> None:
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"the plan chose bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
            "set precision: fp16 (or auto with the right accelerator_type)"
        )


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- internals


def _save_consolidated(engine, spec, kwargs, out_dir: str, rank: int) -> None:
    """fp32 weights of the whole model into out_dir/model.safetensors (rank 0 writes).

    DeepSpeed's fp32 master copy is gathered parameter by parameter (a collective under
    ZeRO-3); where there is none (no mixed precision, or stage 0) the module's own
    parameters are used, upcast to fp32.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from mlplatform._internal import artifact_layout
    from mlplatform.train import models

    full: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        fp32 = safe_get_full_fp32_param(param)
        if fp32 is None:
            fp32 = param.detach()
        if rank == 0:
            full[name] = fp32.detach().float().cpu().clone()
    if rank != 0:
        return
    from safetensors.torch import save_model

    model = models.build(spec.model.ref, kwargs)
    missing = model.load_state_dict(
        {**full, **{n: b.detach().float().cpu() if b.is_floating_point() else b.cpu()
                    for n, b in engine.module.named_buffers()}},
        strict=False,
    )
    if missing.missing_keys:
        # Tied weights appear once in named_parameters(); anything else missing is a bug.
        tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(full)
        leftover = set(missing.missing_keys) - tied
        if leftover:
            raise RuntimeError(f"consolidated weights lack {sorted(leftover)}")
    save_model(model, os.path.join(out_dir, artifact_layout.WEIGHTS))


def _optimizer(spec, model):
    import torch

    o = spec.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


class _Schedule:
    """Multiplier of the peak LR at each optimizer step (picklable: plain numbers only)."""

    def __init__(self, name: str, warmup: int, floor: float, total: int):
        self.name, self.warmup, self.floor, self.total = name, warmup, floor, max(1, total)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 1 - t if self.name == "linear" else 0.5 * (1 + math.cos(math.pi * t))
        return self.floor + (1 - self.floor) * shape


def _get_rng() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    # Only tensors, numbers, strings and containers: loadable with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
