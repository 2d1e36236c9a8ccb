"""The per-worker training loop: DeepSpeed engine, deterministic data order, checkpoints, resume.

Runs inside each Ray Train worker. Ray Train has already created the process group
(gloo on CPUs, NCCL on GPUs); DeepSpeed joins it. Resume restores the model, optimizer
and scheduler (DeepSpeed checkpoint), each rank's RNG state, and the data position:
the data order of an epoch is a pure function of (seed, epoch, rank), so the global
step alone says which micro batches were already consumed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from typing import Any

TAG = "ds"  # DeepSpeed checkpoint tag inside every reported checkpoint directory
# Test hook, read on the driver and passed to workers: "rank:step:marker_file" makes that
# rank exit hard once at that step (the marker file keeps it from repeating after restart).
FAULT_ENV = "MLPLATFORM_TRAIN_FAULT"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is plain data built by mlplatform.train.trainer."""
    import deepspeed
    import ray.train
    import torch

    from mlplatform.train import data, models
    from mlplatform.train.spec import Task, TrainSpec

    started = time.perf_counter()
    spec = TrainSpec.model_validate(config["spec"])
    ds_config = config["deepspeed"]
    precision = config["precision"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = spec.use_gpu
    if use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        _check_gpu_precision(precision, device)
    else:
        device = torch.device("cpu")
        # One worker per reserved CPU: more threads than that only contend.
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", dist_init_required=False)
    dist = torch.distributed

    # ---- data: this worker's deterministic shard, in memory
    x_train, y_train = data.shard_to_arrays(ray.train.get_dataset_shard("train"))
    x_val, y_val = data.shard_to_arrays(ray.train.get_dataset_shard("validation"))
    micro, accum = spec.micro_batch_size, spec.accum_steps
    steps_per_epoch = len(x_train) // (micro * accum)
    if steps_per_epoch == 0:
        raise ValueError(
            f"each worker's shard holds {len(x_train)} samples, fewer than micro_batch_size × grad_accum_steps = "
            f"{micro * accum}; lower global_batch_size or num_workers, or add data"
        )
    total_steps = min(
        spec.max_steps or math.inf, (spec.epochs or math.inf) * steps_per_epoch
    )
    total_steps = int(total_steps)

    # ---- model, optimizer, schedule
    torch.manual_seed(spec.seed)
    stage = ds_config["zero_optimization"]["stage"]
    kwargs = dict(spec.model.kwargs)
    if spec.model.ref == "builtin:gpt":
        kwargs.setdefault("seq_len", spec.dataset.seq_len)
    if stage == 3:
        # Parameters are partitioned as they are created: no worker ever holds the full model.
        with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=_dtype(precision)):
            model = models.build(spec.model.ref, kwargs, spec.activation_checkpointing)
    else:
        model = models.build(spec.model.ref, kwargs, spec.activation_checkpointing)
    optimizer = None if "optimizer" in ds_config else _optimizer(spec, model)
    schedule = _lr_lambda(spec, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
        dist_init_required=False,
    )
    in_dtype = _dtype(precision)

    # ---- resume
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=TAG)
            start_step = int(client["global_step"])
            rng_file = os.path.join(ckpt_dir, f"rng_rank{rank}.pt")
            if os.path.exists(rng_file):
                _set_rng(torch.load(rng_file, weights_only=False))
        _log(rank, f"resumed from checkpoint at step {start_step}/{total_steps}")

    _log(rank, f"ready to train after {time.perf_counter() - started:.1f} s (data shard, DeepSpeed engine, resume)")
    step_log = config.get("step_log")
    gauges = _Gauges(spec.name, rank)
    fault = _fault(config.get("fault"), rank)

    last_checkpoint = start_step if checkpoint else None
    perms: dict[int, Any] = {}

    def batch(epoch: int, index: int):
        if epoch not in perms:
            perms.clear()
            perms[epoch] = _permutation(len(x_train), spec.seed, epoch, rank)
        idx = perms[epoch][index * micro : (index + 1) * micro]
        x = torch.from_numpy(x_train[idx]).to(device)
        y = torch.from_numpy(y_train[idx]).to(device)
        return (x.to(in_dtype) if x.is_floating_point() else x), y

    def loss_of(out, y):
        if spec.task == Task.CLASSIFICATION:
            return torch.nn.functional.cross_entropy(out.float(), y)
        if spec.task == Task.REGRESSION:
            return torch.nn.functional.mse_loss(out.float().squeeze(-1), y)
        return torch.nn.functional.cross_entropy(out.float().reshape(-1, out.shape[-1]), y.reshape(-1))

    units_per_sample = spec.dataset.seq_len if spec.task == Task.CAUSAL_LM else 1
    window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    engine.train()
    step = start_step
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        if fault and step == fault[0]:
            _trip(fault, rank, step, config.get("run_dir"), last_checkpoint)
        step_loss = 0.0
        for m in range(accum):
            x, y = batch(epoch, within * accum + m)
            loss = loss_of(engine(x), y)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / accum
        step += 1
        window_loss += step_loss
        window_steps += 1
        window_samples += micro * accum * world
        if step_log and rank == 0:
            with open(step_log, "a") as f:
                f.write(f"{step} {os.getpid()} {time.time():.6f}\n")
        end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
        ckpt_due = step % spec.checkpoint.every_n_steps == 0 or step == total_steps
        log_due = step % spec.log_every_n_steps == 0
        if not (end_of_epoch or ckpt_due or log_due):
            continue
        elapsed = time.perf_counter() - window_start
        peaks = _all_gather_floats(dist, _peak_memory_mb(device), world)
        metrics: dict[str, Any] = {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch + (1 if step % steps_per_epoch == 0 else 0),
            "progress": round(step / total_steps, 4),
            "loss": window_loss / max(1, window_steps),
            "lr": scheduler.get_last_lr()[0],
            "samples_per_s": window_samples / elapsed if elapsed > 0 else 0.0,
            "peak_memory_mb_per_worker": peaks,
            "peak_memory_mb_max": max(peaks),
        }
        if spec.task == Task.CAUSAL_LM:
            metrics["tokens_per_s"] = metrics["samples_per_s"] * units_per_sample
        gauges.record(metrics, peaks[rank])
        if end_of_epoch:
            metrics.update(_evaluate(engine, spec, x_val, y_val, device, in_dtype, dist))
            engine.train()
        # ray.train.report is a barrier over all workers and a round trip to the controller,
        # so it runs per epoch and per checkpoint; per-step progress goes to the job log and
        # to Ray's metrics (dashboard) without synchronizing.
        if ckpt_due:
            with tempfile.TemporaryDirectory(prefix="mlplatform-ckpt-") as tmp:
                engine.save_checkpoint(tmp, tag=TAG, client_state={"global_step": step})
                torch.save(_get_rng(), os.path.join(tmp, f"rng_rank{rank}.pt"))
                if step == total_steps:
                    _save_consolidated(engine, spec, kwargs, tmp, rank)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_step{step:08d}",
                )
            last_checkpoint = step
        elif end_of_epoch:
            ray.train.report(metrics)
        if rank == 0:
            _log(rank, _progress_line(metrics, spec.task) + f" [{time.perf_counter() - started:.1f} s]")
        window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    if start_step >= total_steps:
        _log(rank, "nothing left to train: the checkpoint is at the last step")


# ---------------------------------------------------------------- helpers


def _evaluate(engine, spec, x_val, y_val, device, in_dtype, dist) -> dict[str, float]:
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
            if spec.task == Task.CLASSIFICATION:
                sums += torch.tensor([(out.argmax(-1) == y).sum().item(),
                                      torch.nn.functional.cross_entropy(out, y, reduction="sum").item(), len(y)])
            elif spec.task == Task.REGRESSION:
                se = ((out.squeeze(-1) - y) ** 2).sum().item()
                sums += torch.tensor([se, se, len(y)])
            else:
                nll = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")
                sums += torch.tensor([0.0, nll.item(), y.numel()])
    sums = sums.to(device)
    dist.all_reduce(sums)
    metric, loss, n = sums.tolist()
    n = max(n, 1)
    if spec.task == Task.CLASSIFICATION:
        return {"val_accuracy": metric / n, "val_loss": loss / n}
    if spec.task == Task.REGRESSION:
        return {"val_rmse": math.sqrt(metric / n), "val_loss": loss / n}
    return {"val_loss": loss / n, "val_perplexity": math.exp(min(loss / n, 50))}


def _save_consolidated(engine, spec, kwargs, out_dir: str, rank: int) -> None:
    """fp32 weights of the whole model into out_dir/model.safetensors (rank 0 writes).

    DeepSpeed's fp32 master copy is gathered parameter by parameter (a collective under
    ZeRO-3); where there is none (no mixed precision, or stage 0) the module's own
    parameters are used, upcast to fp32.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from mlplatform.train import artifact, models

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
    save_model(model, os.path.join(out_dir, artifact.WEIGHTS))


def _optimizer(spec, model):
    import torch

    o = spec.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def _lr_lambda(spec, total_steps: int):
    """Multiplier of the peak LR at each optimizer step (a picklable closure over plain numbers)."""
    s = spec.schedule
    return _Schedule(s.name, s.warmup_steps, s.min_lr_ratio, total_steps)


class _Schedule:
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


def _permutation(n: int, seed: int, epoch: int, rank: int):
    import numpy as np

    return np.random.default_rng([seed, epoch, rank]).permutation(n)


def _dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _check_gpu_precision(precision: str, device) -> None:
    import torch

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"the plan chose bf16 but {torch.cuda.get_device_name(device)} has no bf16; "
            "set precision: fp16 (or auto with the right accelerator_type)"
        )


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _all_gather_floats(dist, value: float, world: int) -> list[float]:
    out: list[Any] = [None] * world
    dist.all_gather_object(out, round(float(value), 1))
    return [float(v) for v in out]


def _get_rng() -> dict[str, Any]:
    import random

    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fault(value: str | None, rank: int):
    if not value:
        return None
    want_rank, step, marker = value.split(":", 2)
    if int(want_rank) != rank or os.path.exists(marker):
        return None
    return int(step), marker


def _trip(fault, rank: int, step: int, run_dir: str | None, last_checkpoint: int | None) -> None:
    # A reported checkpoint is registered when the controller next polls the workers (every
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s): a crash right after a report can lose it. The
    # test hook waits for registration so that the resume point is known exactly.
    if run_dir and last_checkpoint:
        snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with open(snapshot) as f:
                    if f"checkpoint_step{last_checkpoint:08d}" in f.read():
                        break
            except OSError:
                pass
            time.sleep(0.2)
    with open(fault[1], "w") as f:
        f.write(json.dumps({"rank": rank, "step": step, "pid": os.getpid()}))
    _log(rank, f"fault injection: rank {rank} exits hard at step {step}")
    sys.stdout.flush()
    os._exit(1)


def _progress_line(m: dict[str, Any], task) -> str:
    from mlplatform.train.spec import Task

    rate = f"{m['tokens_per_s']:.0f} tokens/s" if task == Task.CAUSAL_LM else f"{m['samples_per_s']:.0f} samples/s"
    line = (
        f"step {m['step']}/{m['total_steps']} ({m['progress']:.0%}) epoch {m['epoch']} loss {m['loss']:.4f} "
        f"lr {m['lr']:.2e} {rate} peak_mem {m['peak_memory_mb_max']:.0f} MB"
    )
    for k in ("val_accuracy", "val_rmse", "val_perplexity"):
        if k in m:
            line += f" {k} {m[k]:.4f}"
    return line


def _log(rank: int, msg: str) -> None:
    # Written straight to stdout: Ray Train's print patch would log each print() twice.
    sys.stdout.write(f"[mlplatform.train rank {rank}] {msg}\n")
    sys.stdout.flush()


class _Gauges:
    """Per-worker training gauges exported through Ray's metrics (Prometheus, dashboard)."""

    def __init__(self, run: str, rank: int):
        from ray.util.metrics import Gauge

        keys = ("run", "rank")
        self.tags = {"run": run, "rank": str(rank)}
        self.gauges = {
            "loss": Gauge("mlplatform_train_loss", "Training loss (mean over the last window).", keys),
            "lr": Gauge("mlplatform_train_learning_rate", "Current learning rate.", keys),
            "samples_per_s": Gauge("mlplatform_train_samples_per_second", "Samples per second, all workers.", keys),
            "tokens_per_s": Gauge("mlplatform_train_tokens_per_second", "Tokens per second, all workers (LMs).", keys),
            "step": Gauge("mlplatform_train_step", "Optimizer steps done.", keys),
            "progress": Gauge("mlplatform_train_progress_ratio", "Share of the run's steps done.", keys),
        }
        self.memory = Gauge("mlplatform_train_peak_memory_bytes", "Peak memory of this worker.", keys)

    def record(self, metrics: dict[str, Any], own_peak_mb: float) -> None:
        for key, gauge in self.gauges.items():
            if key in metrics:
                gauge.set(float(metrics[key]), tags=self.tags)
        self.memory.set(own_peak_mb * 2**20, tags=self.tags)
