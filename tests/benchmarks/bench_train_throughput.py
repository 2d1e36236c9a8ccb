"""Training throughput: the platform's path vs a plain `torchrun` DDP script, side by side.

Same model (the ~1M-parameter built-in GPT), same data (the built-in corpus, byte tokens,
blocks of 65), same micro batch, fp32, AdamW with clipping and cosine LR, 2 processes × 1
thread, gloo. The platform path is `mlplatform.train.train()` on a throwaway local Ray
(TorchTrainer + DeepSpeed ZeRO-0, Ray Data sharding, metric reports, checkpoints). Setup
is excluded on both sides: throughput is timed from rank 0's per-step timestamps after
WARMUP steps. Two ratios are printed:

  steady   steps inside one epoch (no evaluation, report or checkpoint in the window);
  overall  every step after warm-up to the last, with the platform's per-epoch evaluation
           and reports inside the window (the DDP script has neither: a conservative ratio).

The two run in interleaved rounds, alternating which goes first (machines drift); each
round gives a ratio, and the median and the spread over the rounds are printed.

    python tests/benchmarks/bench_train_throughput.py [--rounds 3]   # ~3 min a round on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS, WARMUP, MICRO, SEQ = 240, 10, 16, 64


def ddp_main(out: str) -> None:
    """One torchrun rank: plain PyTorch DDP, nothing from Ray or DeepSpeed."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from mlplatform.train import data, models

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    docs = data.corpus_documents()
    tokens = np.frombuffer("\n\n".join(docs[: int(len(docs) * 0.9)]).encode(), np.uint8)
    n = len(tokens) // (SEQ + 1)
    blocks = torch.from_numpy(tokens[: n * (SEQ + 1)].reshape(n, SEQ + 1).astype(np.int64))
    per = n // world
    shard = blocks[rank * per : (rank + 1) * per]
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(models.build("builtin:gpt", {"seq_len": SEQ}))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(1, s / STEPS))))
    steps_per_epoch = len(shard) // MICRO
    times = []
    for step in range(STEPS):
        epoch, i = divmod(step, steps_per_epoch)
        perm = torch.from_numpy(np.random.default_rng([0, epoch, rank]).permutation(len(shard)))
        batch = shard[perm[i * MICRO : (i + 1) * MICRO]]
        out_ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out_.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss.item()
        times.append(time.time())
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "steps_per_epoch": steps_per_epoch}))
    dist.destroy_process_group()


def run_ddp(workdir: str) -> dict:
    out = os.path.join(workdir, "ddp.json")
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", __file__, "--ddp-worker", out],
        check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(Path(out).read_text())


def run_platform(workdir: str, name: str) -> dict:
    import ray

    from mlplatform import config
    from mlplatform.train import TrainSpec, train

    spec = config.validate(
        {
            "name": name,  # one per round: a run name used before would resume, not train
            "model": {"ref": "builtin:gpt"},
            "dataset": {"path": "builtin:tiny_corpus", "seq_len": SEQ},
            "task": "causal_lm",
            "max_steps": STEPS,
            "global_batch_size": 2 * MICRO,
            "micro_batch_size": MICRO,
            "num_workers": 2,
            "zero_stage": 0,
            "precision": "fp32",
            "optimizer": {"name": "adamw", "lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.1},
            "checkpoint": {"every_n_steps": 10_000, "keep_last": 1},
            "log_every_n_steps": 100,
            "storage_path": os.path.join(workdir, "runs"),
        },
        TrainSpec,
        "bench",
    )
    # 3 CPUs: one per worker plus one for Ray Data's split tasks.
    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:
        train(spec)
    finally:
        ray.shutdown()
    lines = Path(workdir, "runs", spec.name, "steps.log").read_text().split("\n")
    times = [float(line.split()[2]) for line in lines if line]
    from mlplatform.train import data

    # Steps per epoch as the platform computed them: its shard is the equal split of all blocks.
    docs = data.corpus_documents()
    n = len("\n\n".join(docs[: int(len(docs) * 0.9)]).encode()) // (SEQ + 1)
    return {"times": times, "steps_per_epoch": (n // 2) // MICRO}


def rates(run: dict) -> tuple[float, float]:
    t, spe = run["times"], run["steps_per_epoch"]
    samples_per_step = 2 * MICRO
    overall = (len(t) - 1 - WARMUP) * samples_per_step / (t[-1] - t[WARMUP])
    # Steady: the first full epoch after warm-up, minus a step at each end (boundary work).
    lo, hi = max(WARMUP, spe) + 1, min(2 * spe, len(t)) - 2
    if hi - lo < 10:
        lo, hi = WARMUP, spe - 2
    steady = (hi - lo) * samples_per_step / (t[hi] - t[lo])
    return steady, overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ddp-worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved DDP/platform rounds (at least 3)")
    args = parser.parse_args()
    if args.ddp_worker:
        return ddp_main(args.ddp_worker)
    if args.rounds < 3:
        parser.error(f"got {args.rounds} for --rounds; a median and a spread need at least 3")
    started = time.time()
    rounds = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
            order = ("ddp", "platform") if r % 2 == 0 else ("platform", "ddp")
            runs = {k: run_ddp(workdir) if k == "ddp" else run_platform(workdir, f"bench-throughput-{r}") for k in order}
        (d_steady, d_overall), (p_steady, p_overall) = rates(runs["ddp"]), rates(runs["platform"])
        rounds.append((p_steady / d_steady, p_overall / d_overall, d_steady, p_steady))
        print(f"round {r + 1} ({' then '.join(order)}): DDP steady {d_steady:.1f}, platform steady {p_steady:.1f} "
              f"samples/s; ratio steady {rounds[-1][0]:.3f} overall {rounds[-1][1]:.3f}", flush=True)
    steady, overall = [x[0] for x in rounds], [x[1] for x in rounds]
    print(f"GPT ~1M params, micro batch {MICRO} × seq {SEQ}, 2 workers × 1 thread, fp32, {STEPS} steps, warm-up {WARMUP}, "
          f"{args.rounds} interleaved rounds")
    print(f"  torchrun DDP   steady median {statistics.median(x[2] for x in rounds):8.1f} samples/s")
    print(f"  platform path  steady median {statistics.median(x[3] for x in rounds):8.1f} samples/s")
    print(f"RATIO platform/DDP steady median {statistics.median(steady):.3f} (spread {min(steady):.3f}-{max(steady):.3f})  "
          f"overall median {statistics.median(overall):.3f} (spread {min(overall):.3f}-{max(overall):.3f}) (goal >= 0.97)")
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
