"""TLS cost: the same cluster with TLS on (the default), with HTTPS only, and with `tls: false`, side by side.

    .venv/bin/python tests/benchmarks/bench_tls.py [--rounds 2] [--seconds 8]   # ~6 min a round on 2 cores

Each round starts cluster_configs/local/three-region.yaml on free ports in three modes, rotating
which goes first (machines drift):

  tls     as shipped: Ray's internal mutual TLS with the cluster's CA, and Serve over HTTPS;
  https   `tls: false` for Ray's internal traffic, Serve still over HTTPS (a certificate made the
          same way): splits the serving cost between the HTTPS edge and internal TLS;
  plain   `tls: false`, Serve over HTTP.

and measures on each:

  serving   the platform's digits app (FastAPI ingress with API key and contract, ONNX INT8 model
            behind @serve.batch, one replica on the head, as bench_serve's `platform`) at
            concurrency 16 for --seconds from a separate client process (keep-alive
            connections): requests/s, p50 and p99. The proxy → replica hop is a Ray actor call
            over gRPC, under internal TLS in `tls` mode.
  training  (tls and plain) the shipped ZeRO-2 bf16 digits spec (jobs/configs/digits.yaml,
            2 epochs, 2 gloo workers in the `cpu` group): steady steps/s from rank 0's steps.log
            and train()'s wall time. gloo's collectives do not go through Ray, so internal TLS
            touches only Ray's control plane, Ray Data's blocks, and reports and checkpoints.

Printed: each run's figures, then medians over rounds of tls ÷ plain and https ÷ plain
(goal: within 5% either way).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # conftest.free_port, serve_models
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_serve.measure

CONCURRENCY = 16
EPOCHS = 2
MODES = ("tls", "https", "plain")


def run_mode(mode: str, seconds: float, round_: int) -> dict:
    """Start the cluster in `mode`, measure serving (and training, but for `https`), stop it."""
    import ray
    from ray import serve

    from bench_serve import measure
    from conftest import free_port, with_free_ports
    from mlplatform import cluster, config
    from mlplatform.cluster import tls
    from mlplatform.serve import build_app, create_key
    from mlplatform.train import TrainSpec, train
    from serve_models import digits_data, https_options, random_mlp, register_digits

    path = REPO / "cluster_configs/local/three-region.yaml"
    spec = with_free_ports(config.load(path, cluster.ClusterSpec)).model_copy(update={"tls": mode == "tls"})
    running = cluster.up(spec, str(path))
    out: dict = {}
    try:
        # Connected, the cluster's residency policy applies: the model (internal) and the restricted
        # training run each under their classification's storage prefix.
        with tempfile.TemporaryDirectory(prefix="bench-tls-", dir=_prefix("/tmp/mlplatform-internal")) as tmp, \
                tempfile.TemporaryDirectory(prefix="bench-tls-", dir=_prefix("/tmp/mlplatform")) as runs:
            work = Path(tmp)
            cluster.connect(spec.name)
            http = https_options(running)
            if mode == "https":  # the cluster runs without TLS: a certificate of the same kind for Serve alone
                material = tls.ensure(work / "tls", spec.name, ["head"], ip="127.0.0.1")
                http = tls.serve_http_options(material)
                # Read by the load client (bench_serve's https_context). Ray ignores it without RAY_USE_TLS.
                os.environ["RAY_TLS_CA_CERT"] = str(material.ca_cert)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port, **http}, proxy_location="HeadOnly")
            register_digits(work / "registry", work / "artifacts", "digits", weights=random_mlp((128, 64)))
            app = {"name": "digits", "model": "digits@production", "registry_root": str(work / "registry"),
                   "auth": {"keys_dir": str(work / "keys")}, "limits": {"max_rows": 32},
                   "ingress": {"colocate": True},
                   "primary": {"replicas": 1, "num_cpus": 1, "label_selector": {"ray.io/node-group": "head"},
                               "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.005}}}
            serve.run(build_app(app), name="digits", route_prefix="/digits")
            key = create_key("digits", keys_dir=work / "keys").key
            x, _ = digits_data()
            rows = work / "rows.json"
            rows.write_text(json.dumps(x[:256].tolist()))
            scheme = "http" if mode == "plain" else "https"
            run = measure(f"{scheme}://127.0.0.1:{port}/digits/v1/predict", key, rows, CONCURRENCY, seconds)
            if {str(code) for code in run["codes"]} != {"200"}:  # JSON keys: strings
                raise RuntimeError(f"serving answered {run['codes']}, not only 200")
            out.update(rps=run["throughput"], p50_ms=run["p50_ms"], p99_ms=run["p99_ms"])
            serve.shutdown()
            if mode == "https":
                return out

            train_spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec).model_copy(
                update={"name": f"bench-tls-{round_}-{mode}", "epochs": EPOCHS, "storage_path": runs})
            t0 = time.perf_counter()
            train(train_spec)
            out["train_wall_s"] = time.perf_counter() - t0
            times = [float(line.split()[2]) for line in
                     (Path(runs) / train_spec.name / "steps.log").read_text().splitlines() if line]
            warm = min(5, len(times) // 4)  # the first steps pay DeepSpeed's and gloo's warm-up
            out["steps_per_s"] = (len(times) - 1 - warm) / (times[-1] - times[warm])
    finally:
        ray.shutdown()
        cluster.down(spec.name)
    return out


def run_in_process(mode: str, seconds: float, round_: int) -> dict:
    """run_mode in a fresh process: Ray reads its TLS settings once per process."""
    command = [sys.executable, __file__, "--mode", mode, "--seconds", str(seconds), "--round", str(round_)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    results = [line[len("RESULT "):] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not results:
        raise RuntimeError(f"the {mode} run failed (exit {done.returncode}): {done.stdout[-2000:]}")
    return json.loads(results[-1])


def _prefix(path: str) -> str:
    Path(path).mkdir(exist_ok=True)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds of serving load per mode")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one mode, in its own process
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.mode:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run run_mode's finally: stop the cluster
        print("RESULT " + json.dumps(run_mode(a.mode, a.seconds, a.round)))
        return

    from mlplatform.export import cpu_features

    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}  {cpu_features().summary()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    started = time.time()
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in range(a.rounds):
        order = MODES[r % 3:] + MODES[:r % 3]
        runs = {mode: run_in_process(mode, a.seconds, r) for mode in order}
        for mode in order:
            f = runs[mode]
            trained = (f"; training {f['steps_per_s']:.2f} steps/s, train() {f['train_wall_s']:.1f} s"
                       if "steps_per_s" in f else "")
            print(f"round {r + 1} {mode:5s}: serving {f['rps']:.0f} req/s, p50 {f['p50_ms']:.1f} ms, "
                  f"p99 {f['p99_ms']:.1f} ms at c={CONCURRENCY}{trained}", flush=True)
        for mode in ("tls", "https"):
            for k in runs[mode]:
                ratios.setdefault((mode, k), []).append(runs[mode][k] / runs["plain"][k])
    labels = {"rps": "serving req/s", "p50_ms": "serving p50", "p99_ms": "serving p99",
              "steps_per_s": "training steps/s", "train_wall_s": "training wall time"}
    print(f"÷ plain over {a.rounds} rounds, median (spread):")
    for (mode, k), v in ratios.items():
        print(f"  {mode:5s} {labels[k]:20s} {statistics.median(v):.3f}  ({min(v):.3f}-{max(v):.3f})")
    print(f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
