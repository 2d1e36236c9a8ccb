"""Per-worker memory of model + optimizer states, ZeRO-3 vs ZeRO-0, 2 workers, the LM example.

Measured, not estimated: for each stage, 2 processes (gloo, bf16) build the engine through
the platform's own `mlplatform.train.engine` with the DeepSpeed config the platform's plan
makes, and run 3 optimizer steps; each then sums the bytes of every live torch tensor
storage (the CPU analogue of torch.cuda.memory_allocated: parameters, gradients, optimizer
states, DeepSpeed's flat buffers; activations and step temporaries are freed by then) minus
what was alive before the model existed. Peak RSS growth is reported alongside.

Two variants per stage: `plan`, the config exactly as `train plan` builds it (what a job
runs), and `tuned`, the same with DeepSpeed's communication buckets and ZeRO-3 prefetch
shrunk to almost nothing, so that what remains is parameters, gradients and optimizer
states alone. The ratios are compared with the formula's 16Ψ/N ÷ 16Ψ = 0.5 and with the
plan's estimate of the same states and buffers.

    python tests/benchmarks/bench_train_memory.py            # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import warnings
import json
import os
import resource
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

LM = {"d_model": 512, "n_layer": 8, "n_head": 8, "seq_len": 64}  # ~25M parameters: states dominate


def live_tensor_bytes(extra=()) -> int:
    gc.collect()
    seen, total = set(), 0
    for obj in [*extra, *gc.get_objects()]:
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
                storage = obj.untyped_storage()
                key = storage.data_ptr()
                if key and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access
            continue
    return total


# DeepSpeed's buckets and prefetch shrunk: the `tuned` variant measures model states alone.
TUNED = {"reduce_bucket_size": 100_000, "allgather_bucket_size": 100_000, "stage3_prefetch_bucket_size": 100_000,
         "stage3_max_live_parameters": 100_000, "stage3_param_persistence_threshold": 0}


def bench_spec(stage: int):
    from mlplatform import config
    from mlplatform.train import TrainSpec

    return config.validate(
        {"name": "bench", "model": {"ref": "builtin:gpt", "kwargs": LM}, "dataset": {"path": "builtin:tiny_corpus"},
         "task": "causal_lm", "max_steps": 3, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 2,
         "zero_stage": stage, "precision": "bf16"},
        TrainSpec, "bench",
    )


def worker(rank: int, stage: int, variant: str, port: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import deepspeed

    from mlplatform.train import engine, plan

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    spec = bench_spec(stage)
    ds_config = plan(spec).deepspeed_config()
    if variant == "tuned":
        ds_config["zero_optimization"].update(TUNED)
    base_bytes, base_rss = live_tensor_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = engine.build(spec, ds_config, "bf16", 3)
    loss_of = engine.loss_function(spec.task)
    for _ in range(3):
        x = torch.randint(0, 256, (4, 64))
        engine.train_step(run.engine, [(x, x)], loss_of)
    del x
    # Tensors created in C++ (autograd's .grad) have no Python object until touched: touch them.
    grads = [p.grad for p in run.engine.module.parameters() if p.grad is not None]
    states = live_tensor_bytes(grads) - base_bytes
    peak_rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    with open(f"{out}.{stage}.{variant}.{rank}", "w") as f:
        json.dump({"states": states, "peak_rss_growth": peak_rss}, f)
    torch.distributed.barrier()


def measure(stage: int, variant: str, out: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(stage, variant, port, out), nprocs=2)
    per_rank = [json.load(open(f"{out}.{stage}.{variant}.{r}")) for r in range(2)]
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"/tmp/bench_train_memory_{os.getpid()}")
    args = parser.parse_args()
    from mlplatform.train import models, plan
    from mlplatform.train.plan import model_state_bytes

    psi = models.count_params("builtin:gpt", LM)
    t = time.time()
    formula = sum(model_state_bytes(psi, 3, 2)[:3]) / sum(model_state_bytes(psi, 0, 2)[:3])
    mb = 2**20
    print(f"LM example: GPT {LM}, {psi:,} parameters, 2 workers (gloo, bf16), torch {torch.__version__}")
    print(f"  formula model states per worker: ZeRO-0 16Ψ = {16 * psi / mb:.0f} MiB, ZeRO-3 16Ψ/2 = {8 * psi / mb:.0f} MiB")
    for variant in ("plan", "tuned"):
        zero0, zero3 = measure(0, variant, args.out), measure(3, variant, args.out)
        # The plan's estimate of what stays alive between steps: states, plus ZeRO-3's reduce bucket
        # where the config keeps DeepSpeed's default buckets.
        est = {s: (lambda e: e.params + e.grads + e.optimizer + (e.buffers if variant == "plan" else 0))(
            plan(bench_spec(s)).chosen) for s in (0, 3)}
        print(f"[{variant}] measured live tensors per worker: ZeRO-0 {zero0['states'] / mb:.0f} MiB "
              f"(plan estimate {est[0] / mb:.0f}), ZeRO-3 {zero3['states'] / mb:.0f} MiB (plan estimate {est[3] / mb:.0f})")
        print(f"[{variant}] measured peak RSS growth per worker: ZeRO-0 {zero0['peak_rss_growth'] / mb:.0f} MiB, "
              f"ZeRO-3 {zero3['peak_rss_growth'] / mb:.0f} MiB")
        print(f"RATIO [{variant}] ZeRO-3/ZeRO-0 live model+optimizer states: {zero3['states'] / zero0['states']:.3f} "
              f"(formula {formula:.3f}, plan {est[3] / est[0]:.3f})")
        print(f"RATIO [{variant}] ZeRO-3/ZeRO-0 peak RSS growth: {zero3['peak_rss_growth'] / zero0['peak_rss_growth']:.3f}")
    print(f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
