"""Serving benchmark: the platform's app (ingress + ONNX INT8 model, dynamic batching) vs bare Serve.

    .venv/bin/python tests/benchmarks/bench_serve.py [--models digits,wide,xl] [--seconds 5] [--rounds 2]

Starts its own one-node local cluster (`mlplatform.cluster.up`, free ports), registers each
model in a temp registry, and deploys side by side on one Serve instance, per model:

  platform      build_app as serve_apps/digits-cpu.yaml ships it: FastAPI ingress (API key, request
                contract, routing, metrics) colocated with OnnxCpuModel INT8 behind @serve.batch
                (max 32 rows, 5 ms wait) in one replica
  platform-b1   the same app with max_batch_size 1 (batching off, everything else equal)
  platform-split  the same app with a separate ingress deployment (ingress → model: two hops)
  bare-torch    one plain Serve deployment: request.json() → torch FP32 forward → JSON, unbatched
  bare-int8     the same plain deployment running the same INT8 ONNX file through ONNX Runtime
  noop          (once) a plain deployment that returns a constant: Serve's own HTTP cost

`platform` differs from serve_apps/digits-cpu.yaml in these ways, each on purpose:
  - one fixed replica (the yaml autoscales 1-3 replicas with the throughput preset): the bare
    deployments have one, and on 2 cores more replicas would only compete with the client;
  - the model: random weights of each model's shape, registered with a hand-built ONNX export
    and report (tests/serve_models.py), not the trained, export-gated digits@production: an
    MLP's latency does not depend on its weights' values, and the gate is not measured here;
  - placement on the one-node cluster's head group, not `ray.io/node-group: cpu`;
  - Serve's default max_ongoing_requests / max_queued_requests (the yaml: 64 / 128);
    limits.max_rows equal to the batch size (32, as the yaml);
  - each app under its own route prefix on a free port (the yaml: `/` on port 8000); the
    proxy is HeadOnly as in the yaml.

Every model replica gets num_cpus 1 and one compute thread (torch and ONNX Runtime alike).
Load comes from a separate client process (aiohttp, keep-alive, closed loop: `concurrency`
requests always in flight, one row each). One model's apps are deployed at a time (idle
replicas are background load too); each figure is the median over rounds. Figures:

  1. Throughput within p99 ≤ 100 ms: concurrency swept 1…64, best req/s whose p99 fits;
     platform ÷ bare-torch (goal ≥ 4×).
  2. Ingress overhead at concurrency 1: p50 platform-b1 ÷ bare-int8 (goal ≤ 1.1×) and the
     added p50 in ms; noop p50 as Serve's own HTTP anchor (about 2 ms on a big machine).
     Also the split app's p50, and CPU ms per request per process at concurrency 16.
  3. Batching at concurrency 16: platform ÷ platform-b1 req/s, against the model's offline
     ONNX Runtime batch-32 ÷ batch-1 rows/s speedup (goal ≥ 80% of it).

Not collected by pytest (file name does not start with test_). Client and servers share this
machine's cores: on 2 cores the figures are CPU-bound by Serve's per-request work, which the
table's notes explain.
"""

from __future__ import annotations

import argparse
import asyncio
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

import numpy as np

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tests/: conftest.free_port, serve_models

P99_BUDGET_MS = 100.0
CONCURRENCY_SWEEP = (1, 2, 4, 8, 16, 32, 64)
APPS = ("platform", "platform-b1", "platform-split", "bare-torch", "bare-int8")
V2_INPUT = "input"  # the registered test model's input name (tests/serve_models.py signature)
MODELS = {
    # name: (hidden widths, description)
    "digits": ((128, 64), "digits MLP 64-128-64-10 (17k params, the shipped model's shape)"),
    "wide": ((2048, 2048, 2048), "MLP 64-2048x3-10 (8.5M params)"),
    "xl": ((4096, 4096, 4096, 4096), "MLP 64-4096x4-10 (50.6M params)"),
}


# --- the client (runs in its own process: `bench_serve.py --client ...`) ---


async def _load(url: str, key: str, rows: list[list[float]], concurrency: int, seconds: float, warmup: float,
                v2_input: str | None = None) -> dict:
    import aiohttp

    latencies: list[float] = []
    batch_rows: list[int] = []
    codes: dict[int, int] = {}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if v2_input:  # Open Inference Protocol: one FP32 tensor [1, 64] named as the model's input
        bodies = [json.dumps({"inputs": [{"name": v2_input, "shape": [1, len(r)], "datatype": "FP32", "data": r}]}).encode()
                  for r in rows]
    else:
        bodies = [json.dumps({"inputs": [r]}).encode() for r in rows]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    # https:// verified against the cluster's CA (RAY_TLS_CA_CERT, inherited from the bench process).
    from mlplatform.serve._client import https_context

    connector = aiohttp.TCPConnector(limit=concurrency, ssl=https_context() if url.startswith("https://") else True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker(i: int) -> None:
            n = i
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                async with session.post(url, data=bodies[n % len(bodies)], headers=headers) as response:
                    await response.read()
                    t1 = time.perf_counter()
                    if t0 >= measure_from:
                        latencies.append((t1 - t0) * 1000)
                        codes[response.status] = codes.get(response.status, 0) + 1
                        if "X-Batch-Rows" in response.headers:
                            batch_rows.append(int(response.headers["X-Batch-Rows"]))
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return _summary(latencies, seconds, codes, batch_rows)


def _summary(latencies: list[float], seconds: float, codes: dict, batch_rows: list[int]) -> dict:
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies), "throughput": len(latencies) / seconds, "codes": codes,
        "p50_ms": q[49], "p99_ms": q[98], "max_ms": max(latencies, default=0.0),
        "over_budget": sum(t > P99_BUDGET_MS for t in latencies),
        "batch_rows_mean": statistics.fmean(batch_rows) if batch_rows else 1.0,
    }


def _triton_load(url: str, key: str, rows: list[list[float]], concurrency: int, seconds: float, warmup: float,
                 v2_input: str) -> dict:
    """The same closed loop through the official tritonclient.http, unchanged: `url` is
    scheme://host:port/<route prefix>/v2/models/<name>/infer, split into what the client takes."""
    from collections import deque
    from urllib.parse import urlsplit

    import tritonclient.http as triton

    parts = urlsplit(url)
    base, model = parts.path.split("/v2/models/")
    model = model.split("/")[0]
    https = parts.scheme == "https"
    client = triton.InferenceServerClient(
        f"{parts.netloc}{base}", concurrency=concurrency, ssl=https,
        ssl_options={"ca_certs": os.environ["RAY_TLS_CA_CERT"]} if https and os.environ.get("RAY_TLS_CA_CERT") else None)
    headers = {"Authorization": f"Bearer {key}"}

    def request(n: int):
        tensor = triton.InferInput(v2_input, [1, len(rows[0])], "FP32")
        tensor.set_data_from_numpy(np.asarray([rows[n % len(rows)]], dtype=np.float32))
        return time.perf_counter(), client.async_infer(model, [tensor], headers=headers)

    latencies: list[float] = []
    codes: dict[int, int] = {}
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    pending = deque(request(i) for i in range(concurrency))
    n = concurrency
    while pending:
        t0, call = pending.popleft()
        try:
            call.get_result()
            status = 200
        except Exception as e:  # InferenceServerException carries the HTTP status
            status = int(getattr(e, "status", lambda: 0)() or 0) or 599
        t1 = time.perf_counter()
        if t0 >= measure_from:
            latencies.append((t1 - t0) * 1000)
            codes[status] = codes.get(status, 0) + 1
        if t1 < stop_at:
            pending.append(request(n))
            n += 1
    client.close()
    return _summary(latencies, seconds, codes, [])


def client_main(a: argparse.Namespace) -> None:
    rows = json.loads(Path(a.rows).read_text())
    if a.triton:
        print(json.dumps(_triton_load(a.client, a.key, rows, a.concurrency, a.seconds, a.warmup, a.v2_input)))
        return
    print(json.dumps(asyncio.run(_load(a.client, a.key, rows, a.concurrency, a.seconds, a.warmup, a.v2_input))))


def measure(url: str, key: str, rows_file: Path, concurrency: int, seconds: float, warmup: float = 1.0,
            cpu_of: tuple[str, ...] = (), v2_input: str | None = None, triton: bool = False) -> dict:
    """One closed-loop run from a fresh client process. `cpu_of`: Ray process titles (e.g.
    "ProxyActor", "ServeReplica:app:ingress") whose CPU time per request to report. `v2_input`:
    send Open Inference Protocol bodies with this input name (to a /v2/models/NAME/infer URL);
    `triton`: and send them with tritonclient.http."""
    command = [sys.executable, __file__, "--client", url, "--key", key, "--rows", str(rows_file),
               "--concurrency", str(concurrency), "--seconds", str(seconds), "--warmup", str(warmup)]
    command += ["--v2-input", v2_input] if v2_input else []
    command += ["--triton"] if triton else []
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(warmup)  # CPU is counted over the measured seconds only
    before = _cpu_seconds(cpu_of)
    out, err = client.communicate(timeout=seconds + warmup + 120)
    after = _cpu_seconds(cpu_of)
    if client.returncode != 0:
        raise RuntimeError(f"client failed for {url}: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    bad = {c: n for c, n in result["codes"].items() if c != "200"}
    if bad:
        raise RuntimeError(f"{url} at concurrency {concurrency} answered {bad}; the figures would be wrong")
    result["cpu_ms_per_request"] = {k: (after[k] - before.get(k, 0.0)) * 1000 / result["requests"] for k in after}
    return result


def _cpu_seconds(titles: tuple[str, ...]) -> dict[str, float]:
    """user+system CPU seconds of the Ray processes whose title contains each of `titles`."""
    import psutil

    totals = dict.fromkeys(titles, 0.0)
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        for title in titles:
            if line.startswith(f"ray::{title}"):
                try:
                    t = process.cpu_times()
                except psutil.Error:
                    continue
                totals[title] += t.user + t.system
    return totals


# --- the bare Serve baselines (plain deployments, no platform code on the request path) ---


class BareTorch:
    """torch FP32, one thread, one request per forward."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]]):
        import torch

        torch.set_num_threads(1)
        modules = []
        for i, (w, b) in enumerate(pairs):
            linear = torch.nn.Linear(w.shape[1], w.shape[0])
            linear.weight.data, linear.bias.data = torch.from_numpy(w), torch.from_numpy(b)
            modules += [linear] if i == len(pairs) - 1 else [linear, torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*modules).eval()

    async def __call__(self, request) -> dict:
        import torch

        x = torch.tensor((await request.json())["inputs"], dtype=torch.float32)
        with torch.inference_mode():
            return {"outputs": self.model(x).tolist()}


class BareOnnx:
    """The same INT8 ONNX file in ONNX Runtime, one thread, one request per run."""

    def __init__(self, model: bytes):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    async def __call__(self, request) -> dict:
        x = np.asarray((await request.json())["inputs"], dtype=np.float32)
        return {"outputs": self.session.run(None, {"input": x})[0].tolist()}


class Noop:
    async def __call__(self, request) -> dict:
        return {"outputs": []}


# --- the benchmark ---


def offline_speedup(model_file: Path, seconds: float = 1.0) -> float:
    """ONNX Runtime rows/s at batch 32 ÷ batch 1, one thread, in this process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def rows_per_s(batch: int) -> float:
        x = np.random.default_rng(0).random((batch, 64), dtype=np.float32)
        session.run(None, {"input": x})
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.run(None, {"input": x})
            n += 1
        return n * batch / (time.perf_counter() - t0)

    return rows_per_s(32) / rows_per_s(1)


def deploy(model: str, widths: tuple[int, ...], work: Path, port: int) -> dict[str, str]:
    """Register `model` and deploy its four apps; returns app → URL."""
    from ray import serve

    from mlplatform.serve import build_app
    from serve_models import layers, random_mlp, register_digits

    weights = random_mlp(widths)
    version = register_digits(work / "registry", work / "artifacts", model, weights=weights)
    base = {
        "model": f"{model}@production", "registry_root": str(work / "registry"),
        "auth": {"keys_dir": str(work / "keys")},
    }
    apps = {}
    for suffix, batch, colocate in (("platform", 32, True), ("platform-b1", 1, True), ("platform-split", 32, False)):
        name = f"{model}-{suffix}"
        spec = {**base, "name": name, "limits": {"max_rows": batch}, "primary": {
            "replicas": 1, "num_cpus": 1, "label_selector": {"ray.io/node-group": "head"},
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.001}}}
        # Colocated (as serve_apps/digits-cpu.yaml ships): one replica holds ingress and model.
        spec["ingress"] = {"colocate": True} if colocate else {"replicas": 1, "num_cpus": 0.25}
        serve.run(build_app(spec), name=name, route_prefix=f"/{name}", blocking=False)
        apps[suffix] = f"/{name}/v1/predict"
        if suffix == "platform":  # the same app through the Open Inference Protocol endpoint
            apps["platform-v2"] = f"/{name}/v2/models/{name}/infer"
    int8 = next((work / "artifacts").glob(f"{model}-*")) / "model.int8.onnx"
    one_cpu = {"ray_actor_options": {"num_cpus": 1}}
    serve.run(serve.deployment(BareTorch).options(**one_cpu).bind(layers(weights)),
              name=f"{model}-bare-torch", route_prefix=f"/{model}-bare-torch", blocking=False)
    serve.run(serve.deployment(BareOnnx).options(**one_cpu).bind(int8.read_bytes()),
              name=f"{model}-bare-int8", route_prefix=f"/{model}-bare-int8", blocking=False)
    apps["bare-torch"], apps["bare-int8"] = f"/{model}-bare-torch", f"/{model}-bare-int8"
    _wait_running([f"{model}-{s}" for s in APPS])
    print(f"# {model}: registered {version.ref}; apps running", flush=True)
    return {k: f"{_scheme()}://127.0.0.1:{port}{v}" for k, v in apps.items()}


def _scheme() -> str:
    """https on a cluster with TLS (connect() exported RAY_USE_TLS), as Serve was started."""
    return "https" if os.environ.get("RAY_USE_TLS") == "1" else "http"


def _wait_running(names: list[str], timeout_s: float = 300) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = serve.status().applications
        states = {n: str(status[n].status) if n in status else "MISSING" for n in names}
        if all(s.endswith("RUNNING") for s in states.values()):
            return
        failed = {n: status[n].message for n in names if n in status and str(status[n].status).endswith("FAILED")}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        time.sleep(1)
    raise RuntimeError(f"apps not running after {timeout_s:.0f}s: {states}")


def best_within_budget(url: str, key: str, rows: Path, seconds: float) -> tuple[float, int, dict]:
    """(req/s, concurrency, run) of the highest throughput whose p99 ≤ the budget."""
    best: tuple[float, int, dict] = (0.0, 0, {})
    for c in CONCURRENCY_SWEEP:
        run = measure(url, key, rows, c, seconds)
        if run["p99_ms"] <= P99_BUDGET_MS and run["throughput"] > best[0]:
            best = (run["throughput"], c, run)
        if run["p99_ms"] > 2 * P99_BUDGET_MS:
            break  # past the knee: more concurrency only queues
    return best


def bench_model(model: str, urls: dict[str, str], keys: dict[str, str], rows: Path, noop: str, seconds: float) -> dict:
    """One round of every figure for one model (`keys`: app → API key; bare apps ignore it)."""

    def run(app: str, concurrency: int, cpu_of: tuple[str, ...] = ()) -> dict:
        return measure(urls[app], keys.get(app, ""), rows, concurrency, seconds, cpu_of=cpu_of)

    lat = {app: run(app, 1) for app in ("bare-int8", "platform-b1", "platform", "platform-split")}
    lat["noop"] = measure(noop, "", rows, 1, seconds)
    platform = best_within_budget(urls["platform"], keys["platform"], rows, seconds)
    torch_ = best_within_budget(urls["bare-torch"], "", rows, seconds)
    batched = run("platform", 16, ("ProxyActor", f"ServeReplica:{model}-platform:ingress"))
    unbatched = run("platform-b1", 16)
    split = run("platform-split", 16, ("ProxyActor", f"ServeReplica:{model}-platform-split:ingress",
                                       f"ServeReplica:{model}-platform-split:primary"))
    bare = run("bare-int8", 16, ("ProxyActor", f"ServeReplica:{model}-bare-int8:"))
    cpu, split_cpu, bare_cpu = (r["cpu_ms_per_request"] for r in (batched, split, bare))
    # The same app through /v2/models/NAME/infer, by aiohttp and by tritonclient.http (p50 at c=1, req/s at c=16).
    v2 = {}
    for label, triton in (("v2", False), ("triton", True)):
        for c in (1, 16):
            try:
                r = measure(urls["platform-v2"], keys["platform"], rows, c, seconds, v2_input=V2_INPUT, triton=triton)
                v2[f"{label}_c{c}"] = r
            except Exception as e:  # the endpoint missing or refusing: report, keep the other figures
                print(f"# {model} {label} c={c} failed: {str(e)[-300:]}", flush=True)
                v2[f"{label}_c{c}"] = {"p50_ms": float("nan"), "throughput": float("nan"), "p99_ms": float("nan")}
    return {
        "platform_rps": platform[0], "platform_c": platform[1], "torch_rps": torch_[0], "torch_c": torch_[1],
        "budget_ratio": platform[0] / torch_[0] if torch_[0] else float("inf"),
        "p50_bare": lat["bare-int8"]["p50_ms"], "p50_platform_b1": lat["platform-b1"]["p50_ms"],
        "p50_platform": lat["platform"]["p50_ms"], "p50_split": lat["platform-split"]["p50_ms"],
        "p50_noop": lat["noop"]["p50_ms"],
        "overhead_ratio": lat["platform-b1"]["p50_ms"] / lat["bare-int8"]["p50_ms"],
        "overhead_ms": lat["platform-b1"]["p50_ms"] - lat["bare-int8"]["p50_ms"],
        "batched_rps": batched["throughput"], "unbatched_rps": unbatched["throughput"],
        "batch_ratio": batched["throughput"] / unbatched["throughput"], "batch_rows_mean": batched["batch_rows_mean"],
        "batched_p99": batched["p99_ms"], "unbatched_p99": unbatched["p99_ms"],
        "split_rps_c16": split["throughput"], "bare_int8_rps_c16": bare["throughput"],
        "cpu_proxy": cpu["ProxyActor"], "cpu_replica": cpu[f"ServeReplica:{model}-platform:ingress"],
        "cpu_split_proxy": split_cpu["ProxyActor"], "cpu_split_ingress": split_cpu[f"ServeReplica:{model}-platform-split:ingress"],
        "cpu_split_model": split_cpu[f"ServeReplica:{model}-platform-split:primary"],
        "cpu_bare_proxy": bare_cpu["ProxyActor"], "cpu_bare_replica": bare_cpu[f"ServeReplica:{model}-bare-int8:"],
        "bare_int8_p50_c16": bare["p50_ms"],
        **{f"{k}_{f}": r[f] for k, r in v2.items() for f in ("p50_ms", "throughput", "p99_ms")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (after 1 s warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    # client mode (internal)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--key", default="", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--v2-input", default=None, help=argparse.SUPPRESS)
    p.add_argument("--triton", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.client:
        return client_main(a)

    from ray import serve

    from conftest import free_port, with_free_ports
    from mlplatform import cluster
    from mlplatform.cluster.spec import ClusterSpec
    from mlplatform.export import cpu_features
    from mlplatform.serve import create_key
    from serve_models import digits_data, https_options

    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}  {cpu_features().summary()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    # One node, 16 logical CPUs so every app fits at once (the machine's cores are shared anyway).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the cluster
    spec = with_free_ports(ClusterSpec.model_validate({
        "name": "bench-serve", "head": {"name": "head", "cpus": 16, "memory_gb": 8, "region": "me-central-1",
                                        "zone": "me-central-1a"}}))
    cluster.up(spec)
    results: dict[str, list[dict]] = {}
    offline: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            x, _ = digits_data()
            rows = work / "rows.json"
            rows.write_text(json.dumps(x[:256].tolist()))
            cluster.connect(spec.name)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port, **https_options(cluster.find(spec.name))},
                        proxy_location="HeadOnly")
            serve.run(serve.deployment(Noop).options(ray_actor_options={"num_cpus": 0}).bind(), name="noop", route_prefix="/noop")
            noop = f"{_scheme()}://127.0.0.1:{port}/noop"
            names = a.models.split(",")
            for m in names:  # one model's apps at a time: idle replicas are background load too
                urls = deploy(m, MODELS[m][0], work, port)
                offline[m] = offline_speedup(next((work / "artifacts").glob(f"{m}-*")) / "model.int8.onnx")
                keys = {app: create_key(f"{m}-{app}", keys_dir=work / "keys").key for app in APPS[:3]}
                for r in range(a.rounds):
                    results.setdefault(m, []).append(bench_model(m, urls, keys, rows, noop, a.seconds))
                    print(f"# round {r + 1} {m}: {json.dumps({k: round(v, 2) for k, v in results[m][-1].items()})}",
                          flush=True)
                for app in APPS:
                    serve.delete(f"{m}-{app}")
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
        cluster.down(spec.name)
    report(results, offline, names)


def report(results: dict[str, list[dict]], offline: dict[str, float], names: list[str]) -> None:
    def med(m: str, k: str) -> float:
        return statistics.median(r[k] for r in results[m])

    print("\n| model | platform INT8+batching req/s (p99 ≤ 100 ms) | bare torch FP32 req/s (p99 ≤ 100 ms) "
          "| P2 ratio (goal ≥ 4×) | p50 at c=1, ms: bare INT8 / platform-b1 / platform / split | P3 overhead p50 ratio "
          "(goal ≤ 1.1×) | added p50 (ms) | noop p50 (ms) | batched ÷ unbatched req/s at c=16 | offline b32 ÷ b1 "
          "| share of offline (goal ≥ 80%) | mean batch rows at c=16 |")
    print("|" + "---|" * 12)
    for m in names:
        ratio, speed = med(m, "batch_ratio"), offline[m]
        print(f"| {MODELS[m][1]} | {med(m, 'platform_rps'):.0f} | {med(m, 'torch_rps'):.0f} "
              f"| **{med(m, 'budget_ratio'):.2f}×** | {med(m, 'p50_bare'):.1f} / {med(m, 'p50_platform_b1'):.1f} / "
              f"{med(m, 'p50_platform'):.1f} / {med(m, 'p50_split'):.1f} | **{med(m, 'overhead_ratio'):.2f}×** "
              f"| {med(m, 'overhead_ms'):.1f} | {med(m, 'p50_noop'):.1f} | **{ratio:.2f}×** | {speed:.1f}× "
              f"| {ratio / speed:.0%} | {med(m, 'batch_rows_mean'):.1f} |")
    print("\nThe same app through the Open Inference Protocol (POST /v2/models/NAME/infer), one FP32 [1, 64] "
          "tensor per request: p50 at c=1 (ms) and req/s / p99 (ms) at c=16\n")
    print("| model | /v1/predict p50 c=1 | /v2 infer p50 c=1 | tritonclient p50 c=1 | /v1/predict c=16 "
          "| /v2 infer c=16 | tritonclient c=16 |")
    print("|---|---|---|---|---|---|---|")
    for m in names:
        print(f"| {m} | {med(m, 'p50_platform'):.1f} | {med(m, 'v2_c1_p50_ms'):.1f} | {med(m, 'triton_c1_p50_ms'):.1f} "
              f"| {med(m, 'batched_rps'):.0f} / {med(m, 'batched_p99'):.0f} | {med(m, 'v2_c16_throughput'):.0f} / "
              f"{med(m, 'v2_c16_p99_ms'):.0f} | {med(m, 'triton_c16_throughput'):.0f} / {med(m, 'triton_c16_p99_ms'):.0f} |")
    print("\nCPU ms per request at concurrency 16 (proxy + replicas; the client and Ray's own daemons excluded):\n")
    print("| model | platform colocated: proxy + replica = total (req/s) | platform split: proxy + ingress + model "
          "= total (req/s) | bare INT8: proxy + replica = total (req/s) |")
    print("|---|---|---|---|")
    for m in names:
        colocated = (med(m, "cpu_proxy"), med(m, "cpu_replica"))
        split = (med(m, "cpu_split_proxy"), med(m, "cpu_split_ingress"), med(m, "cpu_split_model"))
        bare = (med(m, "cpu_bare_proxy"), med(m, "cpu_bare_replica"))
        print(f"| {m} | {' + '.join(f'{v:.1f}' for v in colocated)} = {sum(colocated):.1f} ({med(m, 'batched_rps'):.0f}) "
              f"| {' + '.join(f'{v:.1f}' for v in split)} = {sum(split):.1f} ({med(m, 'split_rps_c16'):.0f}) "
              f"| {' + '.join(f'{v:.1f}' for v in bare)} = {sum(bare):.1f} ({med(m, 'bare_int8_rps_c16'):.0f}) |")


if __name__ == "__main__":
    main()
