"""Node groups that grow and shrink, with Ray's real autoscaler (v2, fake multi-node provider).

Its own cluster, cluster_configs/local/autoscaling.yaml on free ports: the head and one `cpu`
node run from the start; the `gpu` spot group and the `gpu-ondemand` group start with none.
Every claim is read from Ray: where a task ran (the state API's tasks), which nodes live and
with which labels (its nodes), how many replicas run (Serve's status).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil
import pytest

from autoscaling_load import Timeline, alive_nodes, deploy_pinned_app, load_step, sample_into, wait_until
from conftest import REPO, free_port, with_free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
SPEC = REPO / "cluster_configs/local/autoscaling.yaml"
GPU_SPOT = {"ray.io/node-group": "gpu"}
SIMULATED_GPU = "mlplatform.io/simulated-gpu"


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray

    from mlplatform import cluster, config

    spec = with_free_ports(config.load(SPEC, cluster.ClusterSpec))
    running = cluster.up(spec, str(SPEC))
    try:
        ray.shutdown()  # an earlier test may have left this process on the session's cluster
        cluster.connect(spec.name)
        yield running
    finally:
        ray.shutdown()
        cluster.down(spec.name)
        # `down` leaves no Ray process of this cluster: nodes the autoscaler launched included.
        assert _processes_of(running) == []


def _processes_of(running) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != psutil.Process().pid and proc.environ().get("RAY_AUTH_TOKEN_PATH") == running.token_path:
                found.append(" ".join(proc.info["cmdline"] or []))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [c for c in found if "ray" in c]


@pytest.fixture(scope="module")
def spec():
    from mlplatform import cluster, config

    return config.load(SPEC, cluster.ClusterSpec)


def _where(task_name: str) -> str:
    """The node id the state API says a finished task of this name ran on."""
    from ray.util.state import list_tasks

    def finished():
        return list_tasks(filters=[("name", "=", task_name), ("state", "=", "FINISHED")], detail=True)

    wait_until(lambda: finished() != [], timeout_s=30)  # task events reach the GCS about once a second
    tasks = finished()
    assert len(tasks) == 1, tasks
    return tasks[0].node_id


def _node(node_id: str):
    from ray.util.state import get_node

    return get_node(node_id)


def test_gpu_spot_demand_launches_a_gpu_node_and_idle_nodes_go(autoscaling_cluster, spec):
    import ray

    assert alive_nodes("gpu") == [] and alive_nodes("gpu-ondemand") == []
    assert len(alive_nodes("cpu")) == 1  # the group's min_workers, launched by the autoscaler during `up`

    @ray.remote(num_cpus=1)
    def on_gpu_spot() -> str:
        return ray.get_runtime_context().get_node_id()

    start = time.monotonic()
    ran_on = ray.get(on_gpu_spot.options(label_selector=GPU_SPOT, name="on-gpu-spot").remote(), timeout=60)
    assert time.monotonic() - start < 60
    assert _where("on-gpu-spot") == ran_on
    node = _node(ran_on)
    assert node.labels["ray.io/node-group"] == "gpu" and node.labels["ray.io/market-type"] == "spot"
    assert node.labels["ray.io/availability-zone"] == "me-central-1b" and node.labels[SIMULATED_GPU] == "true"
    assert [n.node_id for n in alive_nodes("gpu")] == [ran_on]

    # Idle for the spec's idle timeout, the launched node is removed.
    idle_timeout = spec.autoscaler.idle_timeout_s
    wait_until(lambda: alive_nodes("gpu") == [], timeout_s=idle_timeout + 60)
    assert _node(ran_on).state == "DEAD"
    assert len(alive_nodes("cpu")) == 1  # never below min_workers


def test_withdrawn_spot_capacity_falls_back_to_on_demand(autoscaling_cluster):
    import ray

    from mlplatform.cluster import local

    @ray.remote(num_cpus=1)
    def anywhere_gpu() -> str:
        return ray.get_runtime_context().get_node_id()

    local.set_bounds(autoscaling_cluster.name, "gpu", max_workers=0)  # the cloud has no spot capacity left
    try:
        time.sleep(5)  # one autoscaler round reads the new bounds
        spot_first = anywhere_gpu.options(
            name="spot-or-on-demand",
            label_selector={SIMULATED_GPU: "true", "ray.io/market-type": "spot"},
            fallback_strategy=[{"label_selector": {SIMULATED_GPU: "true", "ray.io/market-type": "on-demand"}}],
        )
        ran_on = ray.get(spot_first.remote(), timeout=90)
        node = _node(_where("spot-or-on-demand"))
        assert node.node_id == ran_on
        assert node.labels["ray.io/node-group"] == "gpu-ondemand" and node.labels["ray.io/market-type"] == "on-demand"
        assert alive_nodes("gpu") == []
    finally:
        local.set_bounds(autoscaling_cluster.name, "gpu", max_workers=2)


def test_bounds_change_is_refused_with_a_reason(autoscaling_cluster):
    from mlplatform.cluster import local
    from mlplatform.errors import ClusterError

    with pytest.raises(ClusterError, match="has the worker groups cpu, gpu, gpu-ondemand"):
        local.set_bounds(autoscaling_cluster.name, "tpu", max_workers=1)
    with pytest.raises(ClusterError, match="0 <= min_workers <= max_workers"):
        local.set_bounds(autoscaling_cluster.name, "gpu", min_workers=3)
    result = subprocess.run(
        [sys.executable, "-m", "mlplatform", "cluster", "scale", "--name", autoscaling_cluster.name,
         "--group", "gpu", "--max-workers", "-1"], capture_output=True, text=True,
    )
    assert result.returncode != 0 and "min_workers" in result.stderr


def test_serve_replicas_bring_up_nodes_of_their_group_and_both_shrink(autoscaling_cluster, spec):
    from ray import serve

    url = deploy_pinned_app("gpu", free_port(), max_replicas=4)
    timeline = Timeline("gpu")
    stop = threading.Event()
    sampler = threading.Thread(target=sample_into, args=(timeline, stop, time.monotonic()), daemon=True)
    sampler.start()
    try:
        assert load_step(url, seconds=60, concurrency=8) > 0
        peak = timeline.peak()
        # Replicas went past one, and needed more than the one node of 2 CPUs their group started with.
        assert peak.replicas >= 3 and peak.nodes >= 2, timeline.samples
        # After the load: replicas back to min_replicas, then the idle nodes go (one stays for it).
        wait_until(lambda: timeline.last().replicas == 1, timeout_s=90)
        wait_until(lambda: timeline.last().nodes == 1, timeout_s=spec.autoscaler.idle_timeout_s + 90)
    finally:
        stop.set()
        sampler.join()
        serve.delete("autoscale-probe")
    for replica_node in {n.node_id for n in alive_nodes("gpu")}:
        assert _node(replica_node).labels["ray.io/market-type"] == "spot"
