"""Residency preflight: how fast an unsatisfiable restricted job is refused, against Ray alone.

    .venv/bin/python tests/benchmarks/bench_residency.py [--rounds 20]

Starts cluster_configs/local/three-region.yaml on free ports (its UAE residency policy included)
and measures, side by side:

  preflight ok        preflight(spec, policy) of jobs/configs/digits.yaml (uae-restricted, cpu group)
  preflight refused   the same spec aimed at the `eu` node group: ResidencyError (goal < 2 s)
  cli refused         `mlplatform residency check --config <that spec>` as a user runs it
                      (a new process: imports, connect, preflight)
  ray alone           an actor with the selector the platform would have compiled for it
                      ({node-group: eu, region: me-central-1}), created with plain Ray: how long
                      until Ray says anything (it leaves it PENDING_CREATION; we stop looking
                      after --ray-wait seconds)

and the runtime guard's cost: the same cluster started with the policy (every worker process
runs the guard) and without it (plain Ray), alternating on, off, off, on; in each, fresh jobs (a
new driver, so its worker processes start, and run the guard, anew) declared uae-restricted:

  job start           one task to the UAE `cpu` group in a new job: until its result
                      (a worker process starts and, guard on, checks its node first)
  fan-out 1000        then 1000 one-CPU tasks over every UAE node: until all results
                      (each new worker process runs the guard once; goal: within 2% of off)

Figures are medians over rounds; each printed with the machine's CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("MLPLATFORM_HOME", tempfile.mkdtemp(prefix="mlplatform-bench-"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--ray-wait", type=float, default=30.0)
    parser.add_argument("--guard-rounds", type=int, default=5, help="jobs per cluster in the guard's cost")
    args = parser.parse_args()

    import ray
    import yaml
    from ray.util.state import list_actors

    from conftest import with_free_ports
    from mlplatform import cluster, config, residency
    from mlplatform.errors import ResidencyError
    from mlplatform.train import TrainSpec
    from mlplatform.train.preflight import preflight

    path = REPO / "cluster_configs/local/three-region.yaml"
    spec = with_free_ports(config.load(path, cluster.ClusterSpec))
    running = cluster.up(spec, str(path))
    try:
        cluster.connect(running.name)
        policy = residency.current()
        good = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
        bad = good.model_copy(update={"placement": good.placement.model_copy(
            update={"label_selector": {"ray.io/node-group": "eu"}})})

        def timed(call) -> float:
            started = time.perf_counter()
            try:
                call()
            except ResidencyError:
                pass
            return time.perf_counter() - started

        ok = [timed(lambda: preflight(good, policy=policy)) for _ in range(args.rounds)]
        refused = [timed(lambda: preflight(bad, policy=policy)) for _ in range(args.rounds)]
        bad_file = Path(tempfile.mkdtemp()) / "eu.yaml"
        bad_file.write_text(yaml.safe_dump(bad.model_dump(mode="json", exclude_none=True)))
        env = {**os.environ, **running.env()}
        cli = []
        for _ in range(3):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "mlplatform", "residency", "check", "--config", str(bad_file),
                                   "--name", running.name], capture_output=True, text=True, env=env)
            cli.append(time.perf_counter() - started)
            assert done.returncode == 1 and "may only run in regions me-central-1" in done.stderr, done.stderr

        compiled = policy.place(bad.classification, bad.placement.selector(), "placement.label_selector")

        @ray.remote(num_cpus=1)
        class Worker:
            def ready(self) -> bool:
                return True

        actor = Worker.options(label_selector=compiled).remote()
        started = time.perf_counter()
        ready, _ = ray.wait([actor.ready.remote()], timeout=args.ray_wait)
        waited = time.perf_counter() - started
        actor_id = actor._actor_id.hex()
        states = {a.state for a in list_actors(filters=[("actor_id", "=", actor_id)])}
        ray.kill(actor)
    finally:
        ray.shutdown()
        cluster.down(running.name)
    guard_cost: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    own: list[tuple[float, float]] = []
    for mode in ("on", "off", "off", "on"):
        plain = spec if mode == "on" else spec.model_copy(update={"residency_policy": None})
        running = cluster.up(with_free_ports(plain), str(path))
        try:
            guard_cost[mode] += [one_job(running) for _ in range(args.guard_rounds)]
            if mode == "on" and not own:
                own = guard_own_cost(running)
        finally:
            cluster.down(running.name)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores; rounds {args.rounds}")
    print(f"preflight ok       median {statistics.median(ok) * 1000:7.1f} ms")
    print(f"preflight refused  median {statistics.median(refused) * 1000:7.1f} ms  (goal < 2000 ms)")
    print(f"cli refused        median {statistics.median(cli) * 1000:7.1f} ms  (new process: imports + connect)")
    print(f"ray alone          {'started' if ready else 'no answer'} after {waited:.1f} s; actor state {sorted(states)}")
    print(f"guard's own time   check median {statistics.median(c for c, _ in own) * 1000:.1f} ms, import median "
          f"{statistics.median(i for _, i in own) * 1000:.1f} ms per worker process (inside 5 UAE workers)")
    for k, what in enumerate(("job start", "fan-out 1000")):
        on, off = (statistics.median(t[k] for t in guard_cost[m]) for m in ("on", "off"))
        print(f"{what:<18} guard on {on * 1000:7.0f} ms  off {off * 1000:7.0f} ms  ratio {on / off:.3f} "
              f"(medians of {2 * args.guard_rounds} jobs on two clusters each)")


def guard_own_cost(running) -> list[tuple[float, float]]:
    """Inside 5 workers on UAE nodes: (the guard's check, importing its module in a fresh
    interpreter that has Ray loaded, as a worker has), in seconds: its own share of a worker start."""
    import ray

    from mlplatform.cluster import connect
    from mlplatform.residency import guard

    connect(running.name)
    guard.declare("uae-restricted")
    try:
        @ray.remote(num_cpus=0)
        def timed() -> tuple[float, float]:
            started = time.perf_counter()
            for _ in range(20):
                guard.check_this_worker()
            check = (time.perf_counter() - started) / 20
            code = "import time, ray; t = time.perf_counter(); import mlplatform.residency.guard; print(time.perf_counter() - t)"
            imported = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
            return check, imported

        uae = {"ray.io/availability-region": "me-central-1"}
        return ray.get([timed.options(label_selector=uae).remote() for _ in range(5)])
    finally:
        ray.shutdown()


def one_job(running) -> tuple[float, float]:
    """(first task's round trip, 1000 tasks' wall time) in a fresh job of uae-restricted work."""
    import ray

    from mlplatform.cluster import connect
    from mlplatform.residency import guard

    uae = {"ray.io/availability-region": "me-central-1"}
    connect(running.name)
    guard.declare("uae-restricted")
    try:
        @ray.remote(num_cpus=1)
        def noop() -> None:
            return None

        started = time.perf_counter()
        ray.get(noop.options(label_selector={**uae, "ray.io/node-group": "cpu"}).remote())
        first = time.perf_counter() - started
        started = time.perf_counter()
        ray.get([noop.options(label_selector=uae).remote() for _ in range(1000)])
        return first, time.perf_counter() - started
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
