"""The per-worker Ray Train loop: data shard, the engine's steps, reports, checkpoints, resume.

Runs inside each Ray Train worker; the engine, the step and the checkpoint format are
engine.py's (shared with the GPU check, which runs them without Ray). Ray Train has already created the process group
(gloo on CPUs, NCCL on GPUs); DeepSpeed joins it. Resume restores the model, optimizer
and scheduler (DeepSpeed checkpoint), each rank's RNG state, and the data position:
the data order of an epoch is a pure function of (seed, epoch, rank), so the global
step alone says which micro batches were already consumed.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from typing import Any

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is plain data built by mlplatform.train.trainer."""
    import deepspeed
    import ray.train
    import torch

    from mlplatform.train import checkpoints, data, engine
    from mlplatform.train.preflight import storage_filesystem
    from mlplatform.train.spec import Task, TrainSpec

    started = time.perf_counter()
    spec = TrainSpec.model_validate(config["spec"])
    precision = config["precision"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if spec.use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        engine.check_gpu_precision(precision, device)
    else:
        device = torch.device("cpu")
        # One worker per reserved CPU: more threads than that only contend.
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    deepspeed.init_distributed(dist_backend="nccl" if spec.use_gpu else "gloo", dist_init_required=False)
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
    total_steps = int(min(spec.max_steps or math.inf, (spec.epochs or math.inf) * steps_per_epoch))

    # ---- model, optimizer, schedule
    run = engine.build(spec, config["deepspeed"], precision, total_steps)
    batches = engine.Batches(x_train, y_train, micro, spec.seed, rank, device, run.in_dtype)
    loss_of = engine.loss_function(spec.task)

    # ---- resume: the newest complete checkpoint on storage, registered by Ray Train or not
    fs, root = storage_filesystem(spec.storage_path)
    run_dir = f"{root.rstrip('/')}/{spec.name}"
    newest = checkpoints.newest_complete(fs, run_dir)
    checkpoint = ray.train.Checkpoint(newest.path, filesystem=fs) if newest else ray.train.get_checkpoint()
    start_step = 0
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            start_step = engine.load_checkpoint(run, ckpt_dir, rank)
        _log(rank, f"resumed from the checkpoint of step {start_step}/{total_steps} ({checkpoint.path})")

    _log(rank, f"ready to train after {time.perf_counter() - started:.1f} s (data shard, DeepSpeed engine, resume)")
    step_log = config.get("step_log")
    gauges = _Gauges(spec.name, rank)

    # ---- train
    units_per_sample = spec.dataset.seq_len if spec.task == Task.CAUSAL_LM else 1
    window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    run.engine.train()
    step = start_step
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        step_loss = engine.train_step(
            run.engine, (batches.get(epoch, within * accum + m) for m in range(accum)), loss_of
        )
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

        # ---- report: metrics every window, held-out metrics per epoch, checkpoints
        elapsed = time.perf_counter() - window_start
        peaks = [round(float(v), 1) for v in _all_gather(dist, engine.peak_memory_mb(device), world)]
        metrics: dict[str, Any] = {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch + (1 if step % steps_per_epoch == 0 else 0),
            "progress": round(step / total_steps, 4),
            "loss": window_loss / max(1, window_steps),
            "lr": run.scheduler.get_last_lr()[0],
            "samples_per_s": window_samples / elapsed if elapsed > 0 else 0.0,
            "peak_memory_mb_per_worker": peaks,
            "peak_memory_mb_max": max(peaks),
            "resumed_from_step": start_step,
            # What DeepSpeed runs on each rank, read from its engine (stage, precision, loss
            # scale, offload, partition sizes): the record of the run, not a copy of the plan.
            "engine": _all_gather(dist, engine.facts(run.engine), world),
        }
        if spec.task == Task.CAUSAL_LM:
            metrics["tokens_per_s"] = metrics["samples_per_s"] * units_per_sample
        gauges.record(metrics, peaks[rank])
        if end_of_epoch:
            metrics.update(engine.evaluate(run.engine, spec.task, x_val, y_val, device, run.in_dtype, dist))
        # ray.train.report is a barrier over all workers and a round trip to the controller,
        # so it runs per epoch and per checkpoint; per-step progress goes to the job log and
        # to Ray's metrics (dashboard) without synchronizing.
        if ckpt_due:
            with tempfile.TemporaryDirectory(prefix="mlplatform-ckpt-") as tmp:
                engine.save_checkpoint(run, tmp, step, rank, spec if step == total_steps else None)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=checkpoints.dir_name(step),
                )
            dist.barrier()  # every rank's files are on storage: the manifest goes last
            if rank == 0:
                checkpoints.mark_complete(fs, f"{run_dir}/{checkpoints.dir_name(step)}", step, world)
        elif end_of_epoch:
            ray.train.report(metrics)
        if rank == 0:
            _log(rank, _progress_line(metrics, spec.task) + f" [{time.perf_counter() - started:.1f} s]")
        window_start, window_samples, window_loss, window_steps = time.perf_counter(), 0, 0.0, 0
    if start_step >= total_steps:
        _log(rank, "nothing left to train: the checkpoint is at the last step")


# ---------------------------------------------------------------- helpers


def _all_gather(dist, value: Any, world: int) -> list[Any]:
    """Every rank's `value` (picklable), in rank order."""
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


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
