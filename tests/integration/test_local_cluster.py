"""The three-region local cluster, live: labels, resources, placement, auth, lifecycle errors."""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import REPO, with_free_ports
from mlplatform import cluster, config
from mlplatform.cluster import local
from mlplatform.errors import ClusterAlreadyRunning, ClusterNotRunning, NodeStartError, PortInUse

THREE_REGION = REPO / "cluster_configs/local/three-region.yaml"


def test_inventory_matches_the_spec(ray_on_three_region):
    spec = config.load(THREE_REGION, cluster.ClusterSpec)
    nodes = cluster.inventory()
    assert nodes[0].is_head and nodes[0].group == "head"
    assert sorted(n.group for n in nodes) == sorted(g.name for g in spec.groups() for _ in range(g.count))
    for group in spec.groups():
        node = next(n for n in nodes if n.group == group.name)
        assert node.alive
        assert {k: node.labels[k] for k in group.node_labels()} == group.node_labels()
        assert node.resources["CPU"] == group.cpus
        assert node.resources["memory"] == group.memory_gb * 2**30
    gpu = next(n for n in nodes if n.group == "gpu")
    assert gpu.market == "spot" and gpu.labels["mlplatform.io/simulated-gpu"] == "true"
    assert {n.region for n in nodes} == {"me-central-1", "eu-central-1"}


def test_tasks_land_on_the_group_their_selector_names(ray_on_three_region):
    from mlplatform.cluster.probe import probe_node_groups

    results = probe_node_groups()
    assert {r["asked_for_group"] for r in results} == {"head", "cpu", "gpu", "eu"}
    for r in results:
        assert r["labels"]["ray.io/node-group"] == r["asked_for_group"]


def test_job_api_refuses_requests_without_the_token(three_region_cluster):
    url = f"{three_region_cluster.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=10)
    assert e.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {three_region_cluster.token()}"})
    assert json.load(urllib.request.urlopen(request, timeout=10)) is not None
    assert oct(os.stat(three_region_cluster.token_path).st_mode & 0o777) == "0o600"


def test_cli_status_and_env(three_region_cluster):
    run = lambda *a: subprocess.run([sys.executable, "-m", "mlplatform", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout  # noqa: E731
    status = run("cluster", "status", "--name", three_region_cluster.name)
    assert "eu-central-1" in status and "spot" in status and "head (head)" in status
    env = run("cluster", "env", "--name", three_region_cluster.name)
    assert f"export RAY_ADDRESS={three_region_cluster.gcs_address}" in env and "RAY_AUTH_MODE=token" in env
    assert f"export RAY_DASHBOARD_ADDRESS={three_region_cluster.dashboard_url}" in env  # for `serve deploy`
    # `ray status` works with nothing but those variables.
    variables = dict(line.removeprefix("export ").split("=", 1) for line in env.splitlines())
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "status"],
        env={**os.environ, **variables}, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "Active:" in out.stdout


def test_up_while_running_is_refused_and_changes_nothing(three_region_cluster):
    spec = config.load(THREE_REGION, cluster.ClusterSpec)
    with pytest.raises(ClusterAlreadyRunning, match="already running"):
        cluster.up(spec)
    assert all(node.alive() for node in local.find(spec.name).nodes)


def test_port_in_use_starts_nothing(three_region_cluster, tmp_path):
    spec = with_free_ports(config.validate(
        {"name": "portclash", "head": {"name": "head", "cpus": 1, "memory_gb": 1, "region": "r", "zone": "z"}},
        cluster.ClusterSpec, "test",
    ))
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", spec.ports.dashboard))
        holder.listen()
        with pytest.raises(PortInUse, match=rf"Port {spec.ports.dashboard} \(`ports.dashboard` in x.yaml\)"):
            cluster.up(spec, "x.yaml")
    assert not (local.home() / "clusters" / "portclash" / "state.json").exists()


def test_down_with_none_running(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    with pytest.raises(ClusterNotRunning, match="No local cluster is running"):
        cluster.down()


def two_node_spec(name: str):
    """A one-CPU head and a one-CPU worker on free ports: the smallest cluster a lifecycle test needs."""
    return with_free_ports(config.validate(
        {
            "name": name,
            "head": {"name": "head", "cpus": 1, "memory_gb": 1, "region": "r", "zone": "z"},
            "worker_groups": [{"name": "w", "cpus": 1, "memory_gb": 1, "region": "r", "zone": "z"}],
        },
        cluster.ClusterSpec, "test",
    ))


def test_failed_worker_stops_what_was_started(three_region_cluster, monkeypatch):
    spec = two_node_spec("halfstart")
    real = local._node_command
    started = []

    def worker_breaks(group, node_name, flags):
        cmd = real(group, node_name, flags)
        return cmd + ["--no-such-flag"] if group.name == "w" else cmd

    real_spawn = local._spawn
    monkeypatch.setattr(local, "_node_command", worker_breaks)
    monkeypatch.setattr(local, "_spawn", lambda *a: started.append(real_spawn(*a)) or started[-1])
    with pytest.raises(NodeStartError, match="Node 'w-0' .* exited while starting; every node started so far was stopped"):
        cluster.up(spec)
    assert [n.name for n in started] == ["head", "w-0"]
    head = started[0]
    assert not head.alive()
    assert not any(_in_group(p, head.pid) for p in psutil.process_iter())
    assert not (local.home() / "clusters" / "halfstart" / "state.json").exists()
    with pytest.raises(ClusterNotRunning, match="named .halfstart. is running"):
        cluster.find("halfstart")


def _in_group(proc, pgid):
    try:
        return os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False


def test_cli_up_and_down_lifecycle(tmp_path, three_region_cluster):
    import yaml

    spec = with_free_ports(config.load(REPO / "cluster_configs/local/dev.yaml", cluster.ClusterSpec))
    # The copy lives elsewhere: its catalog is named by absolute path.
    spec = spec.model_copy(update={"price_catalog": str(REPO / "cluster_configs/prices/example.yaml")})
    path = tmp_path / "dev.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    cli = [sys.executable, "-m", "mlplatform", "cluster"]
    up = subprocess.run([*cli, "up", "--config", str(path)], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert "Dashboard: http://127.0.0.1" in up.stdout and "head (head)" in up.stdout
    down = subprocess.run([*cli, "down", "--name", "dev"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "Stopped 'dev': 1 node(s)." in down.stdout
    # At once, on the same ports: the stopped head's connections still sit in TIME_WAIT there.
    up = subprocess.run([*cli, "up", "--config", str(path)], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    down = subprocess.run([*cli, "down", "--name", "dev"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    again = subprocess.run([*cli, "down", "--name", "dev"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "No local cluster named 'dev' is running" in again.stderr


def test_down_stops_the_workers_of_a_cluster_whose_head_died():
    import signal

    spec = two_node_spec("headless")
    running = cluster.up(spec)
    head, worker = running.nodes
    os.killpg(head.pid, signal.SIGKILL)
    local._wait_gone([head], 10.0)
    with pytest.raises(ClusterNotRunning, match="headless"):
        cluster.find("headless")  # no head: not running any more...
    cluster.down("headless")  # ...but its worker node is still stopped
    assert not worker.alive()
    assert not any(_in_group(p, worker.pid) for p in psutil.process_iter())
    assert not (local.home() / "clusters" / "headless" / "state.json").exists()


def test_down_stops_the_nodes_of_an_up_that_was_killed(tmp_path, three_region_cluster):
    import time

    import yaml

    spec = two_node_spec("killedup")
    path = tmp_path / "killedup.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    cdir = local.home() / "clusters" / "killedup"
    cli = [sys.executable, "-m", "mlplatform", "cluster"]
    up = subprocess.Popen([*cli, "up", "--config", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Killed (no chance to clean up) once the head runs and the worker is starting.
    deadline = time.monotonic() + 120
    while not ((cdir / "logs" / "w-0.log").exists() and (cdir / "logs" / "w-0.log").read_text()):
        assert up.poll() is None and time.monotonic() < deadline, "`up` ended before its worker started"
        time.sleep(0.1)
    up.kill()
    up.wait()
    recorded = local._read_state(cdir / "state.json")
    assert recorded is not None and [n.name for n in recorded.nodes] == ["head", "w-0"]
    down = subprocess.run([*cli, "down", "--name", "killedup"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "Stopped 'killedup': 2 node(s)." in down.stdout
    assert not any(_in_group(p, n.pid) for n in recorded.nodes for p in psutil.process_iter())
    assert not (cdir / "state.json").exists()
