"""Catalog cost to reach a target accuracy: cost-aware search vs random search, side by side.

For each seed, two searches over the same space with the same trial budget run one after the
other on the same cluster, both stopping at the first trial that reaches the target:
  cost-aware  Optuna TPE + ASHA whose clock is spend (`scheduler.time_attr: cost`)
  random      seeded random sampling, no early stopping
The figure is each search's metered cost (the ledger: Ray's records × the catalog), and the
ratio cost-aware / random per seed; median and spread over seeds.

    .venv/bin/python tests/benchmarks/bench_tune_cost.py --seeds 5

Starts cluster_configs/local/three-region.yaml unless it runs; stops it after if it started it.
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

import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster_configs/local/three-region.yaml"


def search_spec(folder: Path, name: str, seed: int, cost_aware: bool, args) -> Path:
    body = yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())
    body.pop("register", None)
    body.update({
        "name": name, "train": str(REPO / "jobs/configs/digits.yaml"), "storage_path": str(folder),
        "num_samples": args.trials, "max_concurrent_trials": 2, "budget": {},
        "objective": {"kind": "min_cost_to_target", "target": args.target},
        # A space with poor corners (tiny learning rates, tiny layers), where choosing and stopping pay.
        "search_space": {
            "optimizer.lr": {"loguniform": [1e-5, 0.3]},
            "model.kwargs.hidden": {"choice": [[4], [16], [64], [256]]},
            "optimizer.weight_decay": {"uniform": [0.0, 0.05]},
        },
        "searcher": {"name": "optuna_tpe" if cost_aware else "random", "seed": seed},
        "scheduler": {"name": "asha", "time_attr": "cost", "grace_fraction": 0.25, "reduction_factor": 2}
        if cost_aware else {"name": "none"},
    })
    body["overrides"] = {**body["overrides"], "epochs": args.epochs}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def run_search(env: dict, spec: Path, folder: Path, name: str) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "jobs/tune.py", "--config", str(spec)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{(out.stdout + out.stderr)[-4000:]}")
    best = json.loads((folder / name / "results" / "best.json").read_text())
    trials = json.loads((folder / name / "results" / "trials.json").read_text())
    return {"cost": best["cost"]["cost"], "trials": len(trials), "reached": bool(best["target_reached"]),
            "wall_s": round(time.monotonic() - t0, 1), "job_id": best["cost"]["job_id"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=8, help="trial budget of each search")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.95)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO / "platform"))
    from mlplatform import cluster, config

    spec = config.load(CLUSTER, cluster.ClusterSpec)
    started = spec.name not in {c.name for c in cluster.running()}
    running = cluster.up(spec, str(CLUSTER)) if started else cluster.find(spec.name)
    env = {**os.environ, **running.env(), "MLPLATFORM_CLUSTER": running.name,
           "PYTHONPATH": str(REPO / "platform")}
    folder = Path(tempfile.mkdtemp(prefix="bench-tune-", dir="/tmp/mlplatform"))
    rows = []
    try:
        for seed in range(args.seeds):
            pair = {}
            for kind in ("random", "cost-aware"):  # the baseline first, the same seed
                name = f"bench-{kind}-{seed}-{int(time.time())}"
                pair[kind] = run_search(env, search_spec(folder, name, seed, kind == "cost-aware", args), folder, name)
                print(f"seed {seed} {kind:10s} {json.dumps(pair[kind])}", flush=True)
            rows.append({"seed": seed, **pair, "ratio": pair["cost-aware"]["cost"] / pair["random"]["cost"]})
    finally:
        if started:
            cluster.down(spec.name)
    ratios = [r["ratio"] for r in rows]
    print("\n| seed | random cost | trials | reached | cost-aware cost | trials | reached | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["random"], r["cost-aware"]
        print(f"| {r['seed']} | {a['cost']:.6f} | {a['trials']} | {a['reached']} | {b['cost']:.6f} | {b['trials']} "
              f"| {b['reached']} | {r['ratio']:.2f} |")
    print(f"\nratio cost-aware / random: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
          f"max {max(ratios):.2f} over {len(ratios)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
