"""Per-worker memory of model + optimizer states, ZeRO-3 vs ZeRO-0, 2 workers, the LM example.

Measured, not estimated: for each stage, 2 processes (gloo, bf16, DeepSpeed with the
platform's plan and the platform's GPT model) build the engine and run 3 optimizer steps;
each then sums the bytes of every live torch tensor storage (the CPU analogue of
torch.cuda.memory_allocated: parameters, gradients, optimizer states, DeepSpeed's flat
buffers; activations are freed by then) minus what was alive before the model existed.
Peak RSS growth is reported alongside. The ratio is compared with the formula's 16Ψ/N ÷ 16Ψ = 0.5.

    python tests/benchmarks/bench_train_memory.py            # ~2 min on 2 cores
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


def worker(rank: int, stage: int, port: int, out: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import deepspeed

    from mlplatform import config
    from mlplatform.train import TrainSpec, plan
    from mlplatform.train import models

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    spec = config.validate(
        {"name": "bench", "model": {"ref": "builtin:gpt", "kwargs": LM}, "dataset": {"path": "builtin:tiny_corpus"},
         "task": "causal_lm", "max_steps": 3, "global_batch_size": 8, "micro_batch_size": 4, "num_workers": 2,
         "zero_stage": stage, "precision": "bf16"},
        TrainSpec, "bench",
    )
    ds_config = plan(spec).deepspeed_config()
    # Communication buckets and ZeRO-3 prefetch buffers are not model states; shrink them so
    # what is measured is parameters, gradients and optimizer states.
    ds_config["zero_optimization"].update(
        reduce_bucket_size=100_000, allgather_bucket_size=100_000, stage3_prefetch_bucket_size=100_000,
        stage3_max_live_parameters=100_000, stage3_param_persistence_threshold=0,
    )
    base_bytes, base_rss = live_tensor_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    if stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=torch.bfloat16):
            model = models.build("builtin:gpt", LM)
    else:
        model = models.build("builtin:gpt", LM)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, dist_init_required=False)
    for _ in range(3):
        x = torch.randint(0, 256, (4, 64))
        loss = torch.nn.functional.cross_entropy(engine(x).float().reshape(-1, 256), x.reshape(-1))
        engine.backward(loss)
        engine.step()
    del x, loss
    # Tensors created in C++ (autograd's .grad) have no Python object until touched: touch them.
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    states = live_tensor_bytes(grads) - base_bytes
    peak_rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    with open(f"{out}.{stage}.{rank}", "w") as f:
        json.dump({"states": states, "peak_rss_growth": peak_rss}, f)
    torch.distributed.barrier()


def measure(stage: int, out: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(stage, port, out), nprocs=2)
    per_rank = [json.load(open(f"{out}.{stage}.{r}")) for r in range(2)]
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=f"/tmp/bench_train_memory_{os.getpid()}")
    args = parser.parse_args()
    from mlplatform.train import models
    from mlplatform.train.plan import model_state_bytes

    psi = models.count_params("builtin:gpt", LM)
    t = time.time()
    zero0, zero3 = measure(0, args.out), measure(3, args.out)
    formula = sum(model_state_bytes(psi, 3, 2)[:3]) / sum(model_state_bytes(psi, 0, 2)[:3])
    mb = 2**20
    print(f"LM example: GPT {LM}, {psi:,} parameters, 2 workers (gloo, bf16), torch {torch.__version__}")
    print(f"  formula model states per worker: ZeRO-0 16Ψ = {16 * psi / mb:.0f} MiB, ZeRO-3 16Ψ/2 = {8 * psi / mb:.0f} MiB")
    print(f"  measured live tensors per worker: ZeRO-0 {zero0['states'] / mb:.0f} MiB, ZeRO-3 {zero3['states'] / mb:.0f} MiB")
    print(f"  measured peak RSS growth per worker: ZeRO-0 {zero0['peak_rss_growth'] / mb:.0f} MiB, "
          f"ZeRO-3 {zero3['peak_rss_growth'] / mb:.0f} MiB")
    print(f"RATIO ZeRO-3/ZeRO-0 live model+optimizer states: {zero3['states'] / zero0['states']:.3f} (formula {formula:.3f})")
    print(f"RATIO ZeRO-3/ZeRO-0 peak RSS growth: {zero3['peak_rss_growth'] / zero0['peak_rss_growth']:.3f}")
    print(f"({time.time() - t:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
