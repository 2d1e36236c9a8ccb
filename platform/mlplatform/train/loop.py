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
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform import residency
from mlplatform._internal import envelope, keyring, storage
from mlplatform.errors import PreflightError
from mlplatform.train import checkpoints, data, engine
from mlplatform.train._metrics import TrainMetrics
from mlplatform.train.spec import Task, TrainSpec


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is plain data built by mlplatform.train.trainer."""
    started = time.perf_counter()
    spec = TrainSpec.model_validate(config["spec"])
    # Every file this worker writes (checkpoint scratch, step log) stays inside the data's storage prefixes.
    with residency.confined(residency.current(), spec.classification):
        _run(spec, config, started)


def _run(spec: TrainSpec, config: dict[str, Any], started: float) -> None:
    worker = _join(spec, config["precision"])
    shard = _shard(spec)
    run = engine.build(spec, config["deepspeed"], config["precision"], shard.total_steps)
    store = _Storage.of(spec)
    start_step = _resume(run, store, worker.rank, shard.total_steps)
    _log(worker.rank, f"ready to train after {time.perf_counter() - started:.1f} s (data shard, DeepSpeed engine, resume)")
    _train(spec, config.get("step_log"), worker, shard, run, store, start_step, started)
    if start_step >= shard.total_steps:
        _log(worker.rank, "nothing left to train: the checkpoint is at the last step")


@dataclass(frozen=True)
class _Worker:
    """This worker's place in the run: rank, world size, device, and torch.distributed."""

    rank: int
    world: int
    device: Any
    dist: Any


@dataclass(frozen=True)
class _Shard:
    """This worker's deterministic data shard, in memory, and the run's step counts."""

    x_train: Any
    y_train: Any
    x_val: Any
    y_val: Any
    steps_per_epoch: int
    total_steps: int


@dataclass(frozen=True)
class _Storage:
    """Where the run's checkpoints are: the filesystem and <storage_path>/<name>."""

    fs: Any
    run_dir: str
    keys: keyring.Keyring | None = None  # set for restricted data: its checkpoints are encrypted

    @classmethod
    def of(cls, spec: TrainSpec) -> _Storage:
        fs, root = storage.filesystem(spec.storage_path, "storage_path", PreflightError)
        keys = keyring.for_classification(residency.current(), spec.classification)
        return cls(fs, f"{root.rstrip('/')}/{spec.name}", keys)


@dataclass
class _Window:
    """What the steps since the last report add up to."""

    start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    loss: float = 0.0
    steps: int = 0


# ---- setup: device, threads, the process group DeepSpeed joins


def _join(spec: TrainSpec, precision: str) -> _Worker:
    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    if spec.use_gpu:
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
        engine.check_gpu_precision(precision, device)
    else:
        device = torch.device("cpu")
        # One worker per reserved CPU: more threads than that only contend.
        torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    engine.clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend="nccl" if spec.use_gpu else "gloo", dist_init_required=False)
    return _Worker(ctx.get_world_rank(), ctx.get_world_size(), device, torch.distributed)


# ---- data: this worker's deterministic shard, in memory


def _shard(spec: TrainSpec) -> _Shard:
    import ray.train

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
    return _Shard(x_train, y_train, x_val, y_val, steps_per_epoch, total_steps)


# ---- resume: the newest complete checkpoint on storage, registered by Ray Train or not


def _resume(run, store: _Storage, rank: int, total_steps: int) -> int:
    """Restore the newest checkpoint into `run`; the step it was taken at (0: none)."""
    import ray.train

    newest = checkpoints.newest_complete(store.fs, store.run_dir)
    checkpoint = ray.train.Checkpoint(newest.path, filesystem=store.fs) if newest else ray.train.get_checkpoint()
    if not checkpoint:
        return 0
    with checkpoint.as_directory() as ckpt_dir:
        encrypted = any(envelope.is_encrypted(p) for p in Path(ckpt_dir).rglob("*") if p.is_file())
        if store.keys is None and not encrypted:
            start_step = engine.load_checkpoint(run, ckpt_dir, rank)
        else:
            # DeepSpeed reads files by path: decrypt into private scratch inside the data's prefixes,
            # never in place (as_directory may hand out the stored checkpoint itself).
            plain = storage.temp_dir("mlplatform-resume-")
            try:
                keys = store.keys or keyring.cluster_keyring(create=False)
                envelope.decrypt_tree(ckpt_dir, plain, keys, plain_ok=(checkpoints.MANIFEST,))
                start_step = engine.load_checkpoint(run, str(plain), rank)
            finally:
                shutil.rmtree(plain, ignore_errors=True)
    _log(rank, f"resumed from the checkpoint of step {start_step}/{total_steps} ({checkpoint.path})")
    return start_step


# ---- train


def _train(spec: TrainSpec, step_log: str | None, worker: _Worker, shard: _Shard, run, store: _Storage,
           start_step: int, started: float) -> None:
    micro, accum = spec.micro_batch_size, spec.accum_steps
    batches = engine.Batches(shard.x_train, shard.y_train, micro, spec.seed, worker.rank, worker.device, run.in_dtype)
    loss_of = engine.loss_function(spec.task)
    recorded = TrainMetrics(spec.name, worker.rank)
    window = _Window()
    notice = _Notice(worker)
    run.engine.train()
    step = start_step
    while step < shard.total_steps:
        epoch, within = divmod(step, shard.steps_per_epoch)
        step_started = time.perf_counter()
        step_loss = engine.train_step(
            run.engine, (batches.get(epoch, within * accum + m) for m in range(accum)), loss_of
        )
        step += 1
        recorded.step(time.perf_counter() - step_started, micro * accum)
        window.loss += step_loss
        window.steps += 1
        window.samples += micro * accum * worker.world
        if step_log and worker.rank == 0:
            storage.check_write(step_log)
            with open(step_log, "a") as f:
                f.write(f"{step} {os.getpid()} {time.time():.6f}\n")
        end_of_epoch = step % shard.steps_per_epoch == 0 or step == shard.total_steps
        noticed = notice.received(step)
        ckpt_due = noticed or step % spec.checkpoint.every_n_steps == 0 or step == shard.total_steps
        log_due = step % spec.log_every_n_steps == 0
        if not (end_of_epoch or ckpt_due or log_due):
            continue
        metrics = _metrics(spec, run, worker, shard, step, epoch, start_step, window)
        recorded.window(metrics, metrics["peak_memory_mb_per_worker"][worker.rank])
        if end_of_epoch:
            metrics.update(engine.evaluate(
                run.engine, spec.task, shard.x_val, shard.y_val, worker.device, run.in_dtype, worker.dist
            ))
        _report(spec, run, worker, store, step, shard.total_steps, metrics, ckpt_due, end_of_epoch)
        if worker.rank == 0:
            _log(worker.rank, _progress_line(metrics, spec.task) + f" [{time.perf_counter() - started:.1f} s]")
        window = _Window()
        if noticed and step < shard.total_steps:
            notice.hand_over(step)


# ---- preemption: a spot node's notice (Ray's node drain with a deadline) before it goes


class _Notice:
    """Whether this run's workers were told their spot node is going.

    Ray Train's preemption watcher (pinned next to the controller by
    mlplatform.train.preemption) marks every worker when a node of theirs drains. Every rank
    must take the emergency checkpoint at the same step, so with several ranks the flag is
    reduced (max) across them each step: one tiny collective, only while the run has ranks
    on more than one process.
    """

    def __init__(self, worker: _Worker):
        self.worker = worker
        self.info = None

    def received(self, step: int) -> bool:
        import ray.train

        info = ray.train.get_preemption_info()
        flag = info is not None
        if self.worker.world > 1:
            import torch

            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            self.worker.dist.all_reduce(t, op=self.worker.dist.ReduceOp.MAX)
            flag = bool(t.item())
        if flag and self.info is None:
            self.info = info
            _log(self.worker.rank, f"preemption notice at step {step}: taking an emergency checkpoint")
        return flag

    def hand_over(self, step: int) -> None:
        """Stop stepping after the emergency checkpoint: work done now would be lost with the node.

        Ray Train restarts the worker group elsewhere once the deadline passes; waiting longer
        than that means the notice was withdrawn, and the run is restarted from this checkpoint.
        """
        deadline_ms = getattr(self.info, "deadline_ms", None)
        wait_s = max(0.0, deadline_ms / 1000 - time.time()) + 120 if deadline_ms else 300.0
        _log(self.worker.rank, f"checkpoint of step {step} saved; waiting for the node to go (up to {wait_s:.0f} s)")
        time.sleep(wait_s)
        raise RuntimeError(f"preempted at step {step}, but the node was not taken; restarting from the step-{step} checkpoint")


# ---- report: metrics every window, held-out metrics per epoch, checkpoints


def _metrics(spec: TrainSpec, run, worker: _Worker, shard: _Shard, step: int, epoch: int, start_step: int,
             window: _Window) -> dict[str, Any]:
    """The window's training metrics, gathered from every rank (a collective: all ranks call it)."""
    elapsed = time.perf_counter() - window.start
    import ray

    # One gather for both: each rank's peak memory and node (cost metering prices the nodes).
    gathered = _all_gather(
        worker.dist, (engine.peak_memory_mb(worker.device), ray.get_runtime_context().get_node_id()), worker.world
    )
    peaks = [round(float(peak), 1) for peak, _ in gathered]
    metrics: dict[str, Any] = {
        "step": step,
        "total_steps": shard.total_steps,
        "epoch": epoch + (1 if step % shard.steps_per_epoch == 0 else 0),
        "progress": round(step / shard.total_steps, 4),
        "loss": window.loss / max(1, window.steps),
        "lr": run.scheduler.get_last_lr()[0],
        "samples_per_s": window.samples / elapsed if elapsed > 0 else 0.0,
        "peak_memory_mb_per_worker": peaks,
        "peak_memory_mb_max": max(peaks),
        "node_ids": [node for _, node in gathered],
        "resumed_from_step": start_step,
        # What DeepSpeed runs on each rank, read from its engine (stage, precision, loss
        # scale, offload, partition sizes): the record of the run, not a copy of the plan.
        "engine": _all_gather(worker.dist, engine.facts(run.engine), worker.world),
    }
    if spec.task == Task.CAUSAL_LM:
        metrics["tokens_per_s"] = metrics["samples_per_s"] * spec.dataset.seq_len
    return metrics


def _report(spec: TrainSpec, run, worker: _Worker, store: _Storage, step: int, total_steps: int,
            metrics: dict[str, Any], ckpt_due: bool, end_of_epoch: bool) -> None:
    # ray.train.report is a barrier over all workers and a round trip to the controller,
    # so it runs per epoch and per checkpoint; per-step progress goes to the job log and
    # to Ray's metrics (dashboard) without synchronizing.
    import ray.train

    if ckpt_due:
        tmp = storage.temp_dir("mlplatform-ckpt-")  # scratch inside the storage prefixes
        try:
            engine.save_checkpoint(run, str(tmp), step, worker.rank, spec if step == total_steps else None)
            if store.keys is not None:  # restricted data: only ciphertext leaves this scratch directory
                envelope.encrypt_tree(tmp, store.keys)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=checkpoints.dir_name(step),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        worker.dist.barrier()  # every rank's files are on storage: the manifest goes last
        if worker.rank == 0:
            checkpoints.mark_complete(store.fs, f"{store.run_dir}/{checkpoints.dir_name(step)}", step, worker.world)
    elif end_of_epoch:
        ray.train.report(metrics)


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
