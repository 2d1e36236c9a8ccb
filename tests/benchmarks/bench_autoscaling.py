"""Ray's autoscaler on the local fake provider: launch and removal times, and Serve under a load step.

    .venv/bin/python tests/benchmarks/bench_autoscaling.py [--rounds 3] [--png PATH]

Starts cluster_configs/local/autoscaling.yaml on free ports (idle timeout 30 s) and measures:

  launch          a one-CPU task pinned to `ray.io/node-group: gpu` (spot, no node yet): from
                  submission until it ran on the node the autoscaler launched for it
  removal         from that task's end until the state API calls the node DEAD, as a ratio of
                  the configured idle timeout (1.0 = removed exactly at the timeout)
  serve step      a Serve app pinned to `gpu` (1-4 replicas, one CPU each, 0.5 s per request)
                  under 8 closed-loop clients for 60 s, then none: running replicas (Serve's
                  status) and alive `gpu` nodes (the state API) sampled every second, drawn as
                  a PNG (default tests/benchmarks/figures/serve-autoscaling.png)

Figures are medians over rounds; printed with the machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("MLPLATFORM_HOME", tempfile.mkdtemp(prefix="mlplatform-bench-"))
SPEC = REPO / "cluster_configs/local/autoscaling.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--png", type=Path, default=REPO / "tests/benchmarks/figures/serve-autoscaling.png")
    args = parser.parse_args()

    import ray

    from autoscaling_load import Timeline, alive_nodes, deploy_pinned_app, load_step, sample_into, wait_until
    from conftest import free_port, with_free_ports
    from mlplatform import cluster, config

    spec = with_free_ports(config.load(SPEC, cluster.ClusterSpec))
    idle_timeout = spec.autoscaler.idle_timeout_s
    running = cluster.up(spec, str(SPEC))
    try:
        cluster.connect(spec.name)

        @ray.remote(num_cpus=1, label_selector={"ray.io/node-group": "gpu"})
        def on_gpu() -> str:
            return ray.get_runtime_context().get_node_id()

        launches, removals = [], []
        for _ in range(args.rounds):
            assert alive_nodes("gpu") == []
            start = time.monotonic()
            node_id = ray.get(on_gpu.remote(), timeout=120)
            launches.append(time.monotonic() - start)
            ended = time.monotonic()
            wait_until(lambda: node_id not in {n.node_id for n in alive_nodes("gpu")}, timeout_s=idle_timeout + 120)
            removals.append((time.monotonic() - ended) / idle_timeout)
            print(f"launch {launches[-1]:.1f} s; removal {removals[-1]:.2f} x idle timeout", flush=True)

        url = deploy_pinned_app("gpu", free_port(), max_replicas=4)
        timeline = Timeline("gpu")
        stop = threading.Event()
        origin = time.monotonic()
        sampler = threading.Thread(target=sample_into, args=(timeline, stop, origin), daemon=True)
        sampler.start()
        time.sleep(5)
        load_from = time.monotonic() - origin
        served = load_step(url, seconds=60, concurrency=8)
        load_to = time.monotonic() - origin
        wait_until(lambda: timeline.last().replicas == 1 and timeline.last().nodes == 1, timeout_s=idle_timeout + 150)
        time.sleep(5)
        stop.set()
        sampler.join()
    finally:
        ray.shutdown()
        cluster.down(running.name)

    peak = timeline.peak()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; rounds {args.rounds}; idle timeout {idle_timeout:.0f} s")
    print(f"launch: median {statistics.median(launches):.1f} s (pending demand to the task's end on the new node)")
    print(f"removal: median {statistics.median(removals):.2f} x idle timeout")
    print(f"serve step: {served} requests in 60 s; peak {peak.replicas} replicas on {peak.nodes} gpu nodes "
          f"at t={peak.t:.0f} s; back to {timeline.last().replicas} replica on {timeline.last().nodes} node "
          f"by t={timeline.last().t:.0f} s (load {load_from:.0f}-{load_to:.0f} s)")
    draw(timeline, load_from, load_to, args.png)
    print(f"figure: {args.png}")


def draw(timeline, load_from: float, load_to: float, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in timeline.samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.axvspan(load_from, load_to, color="0.9", label="load: 8 clients")
    ax.step(t, [s.replicas for s in timeline.samples], where="post", label="running replicas (Serve)")
    ax.step(t, [s.nodes for s in timeline.samples], where="post", label="alive gpu nodes (Ray state API)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.set_title("Serve replicas and the autoscaler's gpu nodes under a load step")
    ax.legend(loc="upper right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
