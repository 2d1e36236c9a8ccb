"""Local multi-node Ray clusters on one machine, started with `ray start`.

Each node is one `ray start --block` process in a process group of its own: Ray makes
it the group leader and its reaper takes the node's raylet, agents and workers down
with it, so stopping a node is signalling exactly that group. `up` records each
group as soon as it starts it (pid and start time, so a reused pid is never signalled)
in <MLPLATFORM_HOME>/clusters/<name>/state.json; `down` stops exactly those, so an `up`
killed half-way leaves nothing `down` cannot stop. `up` and `down` of one cluster hold
an exclusive lock (`lock` beside the state), so two of them never interleave.

A spec whose worker groups declare `autoscaling:` starts only the head, with Ray's autoscaler
and its fake multi-node provider (autoscaler.py): the autoscaler launches and removes the
worker nodes, as processes in the head's process group, so stopping the head stops them.

Token authentication is always on: `up` writes a fresh token (mode 0600) beside the
state and starts every node with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH.

TLS is on unless the spec says `tls: false`: `up` keeps a CA per cluster and a certificate per
node in <cluster dir>/tls (tls.py) and starts every node with Ray's mutual TLS; `env()` hands
clients the client certificate. Autoscaled nodes inherit the head's environment, so they run on
the head's certificate, valid for this machine's addresses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import tenacity
import yaml

from mlplatform import residency
from mlplatform.residency import guard
from mlplatform.cost import catalog as price_catalog
from mlplatform._internal import storage
from mlplatform.cluster import autoscaler, tls
from mlplatform.cluster.spec import (
    GROUP_LABEL,
    MARKET_LABEL,
    REGION_LABEL,
    ZONE_LABEL,
    ClusterSpec,
    NodeGroup,
)
from mlplatform.errors import (
    ClusterAlreadyRunning,
    ClusterBusy,
    ClusterError,
    ClusterNotRunning,
    NodeStartError,
    PortInUse,
)

_READY = "Ray runtime started."
_GIB = 2**30
# The variables `ray start` turns into Ray's standard node labels (KubeRay sets the same).
_LABEL_ENV = {
    REGION_LABEL: "RAY_NODE_REGION",
    ZONE_LABEL: "RAY_NODE_ZONE",
    GROUP_LABEL: "RAY_NODE_TYPE_NAME",
    MARKET_LABEL: "RAY_NODE_MARKET_TYPE",
}
# Client-side variables that would point a node at some other cluster.
_FOREIGN_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_DASHBOARD_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    *tls.TLS_ENV,
)


def home() -> Path:
    """Where cluster state lives: $MLPLATFORM_HOME, else ~/.mlplatform."""
    return storage.home()


def _cluster_dir(name: str) -> Path:
    return home() / "clusters" / name


@dataclass(frozen=True)
class NodeProcess:
    """One `ray start --block` process and the process group it leads."""

    name: str
    group: str
    pid: int
    started_at: float
    log: str

    def alive(self) -> bool:
        """True while the recorded process (not a later one reusing its pid) runs."""
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.started_at) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


@dataclass(frozen=True)
class LocalCluster:
    """A running local cluster as `up` recorded it."""

    name: str
    config: str
    gcs_address: str
    dashboard_url: str
    client_address: str
    token_path: str
    temp_dir: str
    nodes: tuple[NodeProcess, ...] = field(default_factory=tuple)
    # True when Ray's autoscaler launches the worker nodes (they are not in `nodes`).
    autoscaled: bool = False
    # The cluster's TLS material (tls.py); empty when the spec says `tls: false`.
    tls_dir: str = ""

    def env(self) -> dict[str, str]:
        """Variables that point Ray's CLIs and `ray.init()` at this cluster.

        Each CLI reads its own: `ray status` and `ray.init()` RAY_ADDRESS (the GCS), `ray job`
        RAY_API_SERVER_ADDRESS, `serve deploy/status/shutdown` RAY_DASHBOARD_ADDRESS (both
        the dashboard, which Ray would otherwise look for on port 8265). With TLS on, also the
        client certificate, its key and the cluster CA (RAY_USE_TLS...): Ray refuses a process
        without them; RAY_TLS_CA_CERT is also what `curl --cacert` verifies Serve's HTTPS with.
        """
        env = {
            "RAY_ADDRESS": self.gcs_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }
        if self.tls_dir:
            env.update(tls.Material(Path(self.tls_dir)).client_env())
        return env

    def tls(self) -> "tls.Material | None":
        """The cluster's TLS files, or None when it runs without TLS."""
        return tls.Material(Path(self.tls_dir)) if self.tls_dir else None

    def token(self) -> str:
        """The cluster's authentication token (for the dashboard's login prompt)."""
        return Path(self.token_path).read_text().strip()


def up(spec: ClusterSpec, config: str = "", *, timeout_s: float = 120.0) -> LocalCluster:
    """Start `spec` as a local multi-node cluster and return it once every node runs.

    Raises:
        ClusterBusy: another `up` or `down` of this cluster is in progress.
        ClusterAlreadyRunning: a cluster of this name is running.
        PortInUse: a head port is taken; nothing was started.
        NodeStartError: a node failed; every node already started was stopped again.
    """
    with _exclusive(spec.name):
        return _up(spec, config, timeout_s)


def _up(spec: ClusterSpec, config: str, timeout_s: float) -> LocalCluster:
    cdir = _cluster_dir(spec.name)
    _clear_stale_state(spec.name, config)
    _check_ports_free(spec, config)
    policy = residency.for_cluster_spec(spec, config or None)  # a bad policy starts nothing
    prices = price_catalog.for_cluster_spec(spec, config or None)  # nor does a catalog missing a group

    (cdir / "logs").mkdir(parents=True, exist_ok=True)
    material = None
    if spec.tls:
        # Before anything starts: an expiring certificate stops `up` here, naming the file.
        node_names = ["head"] + ([] if spec.autoscaled() else
                                 [f"{g.name}-{i}" for g in spec.worker_groups for i in range(g.count)])
        material = tls.ensure(cdir / "tls", spec.name, node_names, ip=_node_ip())
    else:
        warnings.warn(tls_off_warning(spec.name, config), stacklevel=2)
    token_path = cdir / "auth_token"
    storage.write_private(token_path, secrets.token_hex(32))
    # Unix socket paths must stay short (~107 bytes), so Ray's temp dir is not under home().
    temp_dir = Path(tempfile.gettempdir()) / f"mlp-{spec.name}-{hashlib.sha256(str(cdir).encode()).hexdigest()[:8]}"
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path), RAY_USAGE_STATS_ENABLED="0")
    # Job entrypoints run `python`: make it this interpreter, the one mlplatform is installed in.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Every Ray worker process on every node inherits the policy: no job can leave it out.
    env.pop(residency.POLICY_ENV, None)
    env[residency.CLUSTER_ENV] = spec.name
    env.update(spec.serve.node_env())  # read by Serve when its processes start: set here, on every node
    for name in guard.node_env():
        env.pop(name, None)
    if policy is not None:
        env[residency.POLICY_ENV] = residency.encode(policy)
        # ...and every worker process of every job starts with the residency guard (see guard.py).
        env.update(guard.node_env())

    # The GCS address is known once the head runs; until then it stays empty in the state.
    cluster = LocalCluster(
        name=spec.name,
        config=config,
        gcs_address="",
        dashboard_url=f"http://127.0.0.1:{spec.ports.dashboard}",
        client_address=f"ray://127.0.0.1:{spec.ports.client_server}",
        token_path=str(token_path),
        temp_dir=str(temp_dir),
        autoscaled=spec.autoscaled(),
        tls_dir=str(material.dir) if material else "",
    )
    head_flags, head_env = _head_flags(spec, temp_dir / "head"), env
    if spec.autoscaled():
        # Ray's autoscaler launches every worker group's nodes (see autoscaler.py).
        config_path = cdir / "autoscaling.yaml"
        storage.atomic_write(config_path, yaml.safe_dump(
            autoscaler.render_fake_provider_config(spec, f"{_node_ip()}:{spec.ports.gcs}"), sort_keys=False))
        head_flags = [*head_flags, f"--autoscaling-config={config_path}"]
        head_env = {**env, **autoscaler.head_env()}
    try:
        # Each node gets its own temp dir: a node's log monitor streams every log under
        # its temp dir to the drivers, so a shared one prints each line once per node.
        head = _spawn(spec.head, "head", head_flags, head_env, cdir, material)
        cluster = _add_node(cluster, head)
        _wait_ready([head], timeout_s)
        ip = (temp_dir / "head" / "ray_current_cluster").read_text().strip().rsplit(":", 1)[0]
        cluster = replace(cluster, gcs_address=f"{ip}:{spec.ports.gcs}")
        _write_state(cluster)
        if policy is not None:
            _publish_policy(cluster, policy, env)
        if prices is not None:
            _publish_catalog(cluster, prices, env)
        if spec.autoscaled():
            _wait_http(cluster.dashboard_url, timeout_s, head)
            _wait_min_workers(cluster, spec, timeout_s, head)
        # One at a time: nodes starting side by side on one machine race for ports.
        for group in [] if spec.autoscaled() else spec.worker_groups:
            for i in range(group.count):
                node_name = f"{group.name}-{i}"
                flags = [f"--address={cluster.gcs_address}", f"--temp-dir={temp_dir / node_name}"]
                node = _spawn(group, node_name, flags, env, cdir, material)
                cluster = _add_node(cluster, node)
                _wait_ready([node], timeout_s)
        _wait_http(cluster.dashboard_url, timeout_s, head)
    except BaseException as e:
        survivors = _stop_nodes(list(cluster.nodes))
        if survivors:
            raise ClusterError(f"{e}\n{_survivors_message(cluster, survivors)}") from e
        _stop_stragglers(cluster)
        (cdir / "state.json").unlink(missing_ok=True)
        token_path.unlink(missing_ok=True)
        if isinstance(e, NodeStartError):
            # Ray's own logs (raylet, GCS) say why; keep them and point at them.
            # Nodes start one at a time, so the last one started is the one that failed.
            raise NodeStartError(
                f"{e}\nRay's logs: {temp_dir / cluster.nodes[-1].name}/session_latest/logs"
            ) from None
        raise
    return cluster


def _publish_policy(cluster: LocalCluster, policy, env: Mapping[str, str]) -> None:
    """The policy into the GCS too, for drivers outside the cluster (see mlplatform.residency.active)."""
    done = subprocess.run(
        [sys.executable, "-m", "mlplatform.residency.active", cluster.gcs_address],
        input=residency.encode(policy), env={**env, **cluster.env()}, capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0:
        raise NodeStartError(f"Could not store the residency policy in the cluster's GCS: {_tail(done.stderr)}")


def _publish_catalog(cluster: LocalCluster, catalog, env: Mapping[str, str]) -> None:
    """The price catalog into the GCS, for every job's cost ledger (see mlplatform.cost.catalog.current)."""
    done = subprocess.run(
        [sys.executable, "-m", "mlplatform.cost.catalog", cluster.gcs_address],
        input=price_catalog.encode(catalog), env={**env, **cluster.env()}, capture_output=True, text=True, timeout=60,
    )
    if done.returncode != 0:
        raise NodeStartError(f"Could not store the price catalog in the cluster's GCS: {_tail(done.stderr)}")


def tls_off_warning(name: str, config: str = "") -> str:
    """What `validate` and `up` say about a spec with `tls: false`."""
    where = config or "its spec"
    return (f"Cluster '{name}' runs WITHOUT TLS (`tls: false` in {where}): Ray's internal traffic and Serve's "
            "HTTP are plaintext and any process that can reach its ports and holds the token is let in. "
            "Remove `tls: false` to encrypt and authenticate them.")


def _add_node(cluster: LocalCluster, node: NodeProcess) -> LocalCluster:
    """`cluster` with `node` added, recorded at once: were `up` killed now, `down` still stops it."""
    cluster = replace(cluster, nodes=(*cluster.nodes, node))
    _write_state(cluster)
    return cluster


def down(name: str | None = None) -> LocalCluster:
    """Stop exactly the nodes `up` started for cluster `name` (or the only running one).

    A named cluster whose head already died (or whose `up` was killed half-way) still has
    its remaining nodes stopped.

    Raises:
        ClusterNotRunning: no such cluster is running.
        ClusterBusy: another `up` or `down` of this cluster is in progress.
        ClusterError: a node could not be stopped; its state is kept, so `down` can be run again.
    """
    name = name or find().name
    state = _cluster_dir(name) / "state.json"
    if not state.exists():
        find(name)  # raises ClusterNotRunning, naming the clusters that do run
    with _exclusive(name):
        cluster = _read_state(state) or find(name)  # gone meanwhile: find raises ClusterNotRunning
        survivors = _stop_nodes(list(cluster.nodes))
        if survivors:
            raise ClusterError(_survivors_message(cluster, survivors))
        _stop_stragglers(cluster)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
        state.unlink(missing_ok=True)
        Path(cluster.token_path).unlink(missing_ok=True)
    return cluster


def renew_certs(name: str) -> tuple[list[Path], bool]:
    """New node and client certificates for cluster `name` from its CA; returns them and whether it runs.

    Raises:
        CertificateError: the cluster has no CA (never started with TLS), or its CA is expiring.
    """
    with _exclusive(name):
        renewed = tls.renew(_cluster_dir(name) / "tls", name, ip=_node_ip())
    return renewed, any(c.name == name for c in running())


def set_bounds(name: str | None, group: str, *, min_workers: int | None = None, max_workers: int | None = None) -> tuple[int, int]:
    """Change an autoscaled group's node bounds on a running local cluster; returns (min, max).

    The autoscaler reads its config afresh every round, so it acts on the change within seconds:
    raising `min_workers` launches nodes, `max_workers: 0` withdraws the group's capacity (work
    with a fallback then goes to another group, as when a cloud runs out of spot capacity).

    Raises:
        ClusterError: the cluster runs without the autoscaler, or has no such group, or the
            bounds are inconsistent.
    """
    cluster = find(name)
    path = _cluster_dir(cluster.name) / "autoscaling.yaml"
    with _exclusive(cluster.name):
        if not path.exists():
            raise ClusterError(
                f"Cluster '{cluster.name}' runs without Ray's autoscaler, so its groups have fixed sizes; declare "
                "`autoscaling: {min_workers, max_workers}` on a worker group of its spec and start it again."
            )
        config = yaml.safe_load(path.read_text())
        node_types = config["available_node_types"]
        if group not in node_types or group == autoscaler.FAKE_HEAD_NODE_TYPE:
            groups = ", ".join(t for t in node_types if t != autoscaler.FAKE_HEAD_NODE_TYPE)
            raise ClusterError(f"Got `{group}` for `--group`; cluster '{cluster.name}' has the worker groups {groups}.")
        node_type = node_types[group]
        low = node_type["min_workers"] if min_workers is None else min_workers
        high = node_type["max_workers"] if max_workers is None else max_workers
        if not 0 <= low <= high:
            raise ClusterError(
                f"Got min_workers {low} and max_workers {high} for group `{group}`; they must satisfy "
                "0 <= min_workers <= max_workers."
            )
        node_type.update(min_workers=low, max_workers=high)
        config["max_workers"] = sum(t.get("max_workers", 0) for t in node_types.values())
        storage.atomic_write(path, yaml.safe_dump(config, sort_keys=False))
    return low, high


def running() -> list[LocalCluster]:
    """Every local cluster whose head node still runs."""
    found = []
    for state in sorted((home() / "clusters").glob("*/state.json")):
        cluster = _read_state(state)
        if cluster is not None and cluster.nodes and cluster.nodes[0].alive():
            found.append(cluster)
    return found


def find(name: str | None = None) -> LocalCluster:
    """The running local cluster called `name`, or the only one when `name` is None.

    Raises:
        ClusterNotRunning: none (or, without a name, more than one) is running.
    """
    clusters = running()
    if name is not None:
        match = [c for c in clusters if c.name == name]
        if not match:
            names = ", ".join(c.name for c in clusters) or "none"
            raise ClusterNotRunning(
                f"No local cluster named '{name}' is running (running: {names}). "
                f"Start it with `mlplatform cluster up --config cluster_configs/local/{name}.yaml`."
            )
        return match[0]
    if not clusters:
        raise ClusterNotRunning(
            "No local cluster is running. Start one with "
            "`mlplatform cluster up --config cluster_configs/local/dev.yaml`."
        )
    if len(clusters) > 1:
        names = ", ".join(c.name for c in clusters)
        raise ClusterNotRunning(f"Several local clusters are running ({names}); name one with `--name`.")
    return clusters[0]


# --- starting nodes ---------------------------------------------------------------


def _head_flags(spec: ClusterSpec, temp_dir: Path) -> list[str]:
    return [
        "--head",
        f"--port={spec.ports.gcs}",
        f"--dashboard-port={spec.ports.dashboard}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--ray-client-server-port={spec.ports.client_server}",
        f"--temp-dir={temp_dir}",
    ]


def _node_command(group: NodeGroup, node_name: str, flags: list[str]) -> list[str]:
    """The `ray start` command line for one node of `group`."""
    custom_labels = {k: v for k, v in group.node_labels().items() if k not in _LABEL_ENV}
    ray_cli = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_cli if os.path.exists(ray_cli) else "ray",
        "start",
        "--block",
        *flags,
        f"--num-cpus={group.cpus}",
        f"--num-gpus={group.gpus}",
        f"--memory={int(group.memory_gb * _GIB)}",
        f"--object-store-memory={int(group.object_store_gb * _GIB)}",
        f"--node-name={node_name}",
        # Several nodes share this machine: each gets its own ports, picked where the
        # kernel never hands out ephemeral ports, so no other bind can take them first.
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        "--disable-usage-stats",
        "--log-style=record",
        "--log-color=false",
    ]
    if group.resources:
        cmd.append(f"--resources={json.dumps(group.resources)}")
    if custom_labels:
        cmd.append("--labels=" + ",".join(f"{k}={v}" for k, v in custom_labels.items()))
    return cmd


def _spawn(group: NodeGroup, node_name: str, flags: list[str], env: Mapping[str, str], cdir: Path,
           material: "tls.Material | None" = None) -> NodeProcess:
    import psutil

    node_env = dict(env)
    if material is not None:
        node_env.update(material.node_env(node_name))
    for label, var in _LABEL_ENV.items():
        node_env[var] = group.node_labels()[label]
    log = cdir / "logs" / f"{node_name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _node_command(group, node_name, flags),
            env=node_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: the node outlives this process and a Ctrl-C here.
            start_new_session=True,
        )
    return NodeProcess(node_name, group.name, proc.pid, psutil.Process(proc.pid).create_time(), str(log))


def _wait_ready(nodes: list[NodeProcess], timeout_s: float) -> None:
    pending = list(nodes)

    def still_starting() -> list[NodeProcess]:
        for node in list(pending):
            text = Path(node.log).read_text(errors="replace")
            if _READY in text:
                pending.remove(node)
            elif not node.alive():
                raise NodeStartError(
                    f"Node '{node.name}' (group '{node.group}') exited while starting; "
                    f"every node started so far was stopped again.\n{_tail(text)}\nFull log: {node.log}"
                )
        return pending

    def timed_out(_: tenacity.RetryCallState) -> None:
        raise NodeStartError(
            f"Node(s) {', '.join(n.name for n in pending)} did not start within {timeout_s:.0f}s; every node "
            f"started so far was stopped again. Logs: {pending[0].log}"
        )

    _poll_while(still_starting, timeout_s, 0.2, timed_out)


def _poll_while(check, timeout_s: float, every_s: float, on_timeout) -> None:
    """Call `check()` every `every_s` while it returns something truthy; `on_timeout(state)` after `timeout_s`."""
    tenacity.Retrying(
        retry=tenacity.retry_if_result(bool), stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(every_s), retry_error_callback=on_timeout,
    )(check)


def _wait_http(url: str, timeout_s: float, head: NodeProcess) -> None:
    def answers() -> None:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
        except urllib.error.HTTPError:
            pass  # It answers (401 without a token): the job API is up.

    def gave_up(_: tenacity.RetryCallState) -> None:
        raise NodeStartError(
            f"The dashboard at {url} did not come up within {timeout_s:.0f}s; "
            f"every node was stopped again. Head log: {head.log}"
        )

    tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(OSError),  # URLError included: not listening yet
        stop=tenacity.stop_after_delay(timeout_s) | (lambda _: not head.alive()),
        wait=tenacity.wait_fixed(0.3), retry_error_callback=gave_up,
    )(answers)


def _node_ip() -> str:
    """The address the head will advertise (Ray's own choice), known before it starts."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _wait_min_workers(cluster: LocalCluster, spec: ClusterSpec, timeout_s: float, head: NodeProcess) -> None:
    """Wait until the autoscaler has launched every group's minimum of nodes."""
    wanted = {g.name: autoscaler.bounds(g)[0] for g in spec.worker_groups}
    have: dict[str, int] = {}

    def missing() -> bool:
        nonlocal have
        if not head.alive():
            raise NodeStartError(f"The head node exited while the autoscaler launched nodes. Head log: {head.log}")
        have = _alive_nodes_by_group(cluster)
        return any(have.get(g, 0) < n for g, n in wanted.items())

    def gave_up(_: tenacity.RetryCallState) -> None:
        short = ", ".join(f"{g}: {have.get(g, 0)} of {n}" for g, n in wanted.items() if have.get(g, 0) < n)
        raise NodeStartError(
            f"The autoscaler did not launch every group's min_workers within {timeout_s:.0f}s ({short}); every "
            f"node was stopped again. Its log: {cluster.temp_dir}/head/session_latest/logs/monitor.log"
        )

    _poll_while(missing, timeout_s, 1.0, gave_up)


def _alive_nodes_by_group(cluster: LocalCluster) -> dict[str, int]:
    """Alive nodes per `ray.io/node-group`, from the dashboard's state API (no driver needed)."""
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/v0/nodes?limit=1000&detail=true",
        headers={"Authorization": f"Bearer {cluster.token()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            nodes = json.load(response)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return {}  # the dashboard is still starting
    counts: dict[str, int] = {}
    for node in nodes:
        if node.get("state") == "ALIVE":
            group = (node.get("labels") or {}).get(GROUP_LABEL, "")
            counts[group] = counts.get(group, 0) + 1
    return counts


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


# --- ports ------------------------------------------------------------------------


def _check_ports_free(spec: ClusterSpec, config: str) -> None:
    where = config or "the cluster spec"
    for field_name, port in spec.ports.model_dump().items():
        if not _port_free(port):
            raise PortInUse(
                f"Port {port} (`ports.{field_name}` in {where}) is already in use by another process; "
                f"choose a free port there or stop that process (`ss -ltnp 'sport = :{port}'` shows it). "
                "Nothing was started."
            )


def _port_free(port: int) -> bool:
    """Whether Ray's servers could listen on `port` now.

    They bind with SO_REUSEADDR, so sockets of a stopped cluster left in TIME_WAIT do not
    block them (a plain bind here would call the port taken for up to a minute after
    `down`); a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    # Where SO_REUSEADDR lets a wildcard bind share a port with a listener on one address
    # (BSD, macOS), the bind succeeds; connecting finds that listener.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


# Above Ray's worker ports (10002-19999), below Linux's ephemeral range (32768+).
_NODE_PORTS = range(20000, 32768)


def _free_port(tries: int = 200) -> int:
    for _ in range(tries):
        port = random.choice(_NODE_PORTS)
        if port not in _handed_out and _port_free(port):
            _handed_out.add(port)
            return port
    raise PortInUse(
        f"Found no free port for a node's agents in {_NODE_PORTS.start}-{_NODE_PORTS.stop - 1} after {tries} "
        "random tries: that range is nearly full. Stop clusters or processes listening there "
        "(`ss -ltn` lists them) and run `up` again."
    )


_handed_out: set[int] = set()  # ports given to nodes of this process, not yet bound


# --- stopping nodes ---------------------------------------------------------------


_STOP_GRACE_S = 10.0  # from SIGTERM to SIGKILL
_KILL_WAIT_S = 10.0  # for SIGKILLed processes to go


def _stop_nodes(nodes: list[NodeProcess]) -> list[NodeProcess]:
    """Stop workers before the head; SIGTERM each group, SIGKILL what outlives the grace.

    Returns the nodes whose process group still has a live process (not ours to
    signal, or stuck in the kernel): their state must not be forgotten.
    """
    # A group whose leader died may still hold processes (a node's agents outlive it): stop
    # those too. Linux never reuses a pid while it names a live process group, so it is ours.
    live = [n for n in reversed(nodes) if n.alive() or _group_exists(n.pid)]
    for node in live:
        _signal_group(node.pid, signal.SIGTERM)
    _wait_gone(live, _STOP_GRACE_S)
    for node in live:
        _signal_group(node.pid, signal.SIGKILL)
    _wait_gone(live, _KILL_WAIT_S)
    return [n for n in nodes if _group_exists(n.pid)]


def _stop_stragglers(cluster: LocalCluster) -> None:
    """Stop the cluster's processes that left its nodes' process groups.

    Job drivers run in sessions of their own, and a worker may outlive its raylet for a
    few seconds. Each carries the cluster's token path in its environment (no other
    cluster's process does); of those, only Ray's own processes and job drivers are
    stopped, never a user's program that merely connected to the cluster.
    """
    import psutil

    def stragglers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                env = proc.environ()
                if env.get("RAY_AUTH_TOKEN_PATH") != cluster.token_path:
                    continue
                command = " ".join(proc.info["cmdline"] or [])
                if command.startswith("ray::") or "/site-packages/ray/" in command or "RAY_JOB_CONFIG_JSON_ENV_VAR" in env:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    left = stragglers()
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=_STOP_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=_KILL_WAIT_S)


def _survivors_message(cluster: LocalCluster, survivors: list[NodeProcess]) -> str:
    nodes = ", ".join(f"{n.name} (process group {n.pid})" for n in survivors)
    return (
        f"Could not stop node(s) {nodes} of cluster '{cluster.name}'; its state is kept in "
        f"{_cluster_dir(cluster.name)}. Stop them yourself (`kill -KILL -- -PGID`, as their owner or root), "
        f"then run `mlplatform cluster down --name {cluster.name}` again."
    )


def _wait_gone(nodes: list[NodeProcess], timeout_s: float) -> None:
    """Wait up to `timeout_s` for the nodes' process groups to go; the caller checks what is left."""

    def any_left() -> bool:
        for node in nodes:
            _reap(node.pid)
        return any(_group_exists(n.pid) for n in nodes)

    _poll_while(any_left, timeout_s, 0.2, lambda _: None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def _reap(pid: int) -> None:
    # Our own children would linger as zombies until reaped.
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# --- state ------------------------------------------------------------------------


def _clear_stale_state(name: str, config: str) -> None:
    state = _cluster_dir(name) / "state.json"
    cluster = _read_state(state)
    if cluster is None:
        return
    if cluster.nodes and cluster.nodes[0].alive():
        raise ClusterAlreadyRunning(
            f"Cluster '{name}' is already running (head at {cluster.gcs_address}, dashboard "
            f"{cluster.dashboard_url}). Stop it first with `mlplatform cluster down --name {name}`, "
            "or use it as it is."
        )
    # The head is gone (a reboot, a killed process): stop any leftover node, forget the rest.
    survivors = _stop_nodes(list(cluster.nodes))
    if survivors:
        raise ClusterError(_survivors_message(cluster, survivors))
    state.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(name: str) -> Iterator[None]:
    """Hold cluster `name`'s lock: one `up` or `down` of it at a time, across processes.

    The kernel releases the lock when its holder dies, so a killed `up` never leaves the
    cluster locked; a second `up` or `down` fails at once rather than queueing behind it.
    """
    lock = _cluster_dir(name) / "lock"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(storage.file_lock(lock, timeout_s=0))
        except storage.LockBusy:
            raise ClusterBusy(
                f"Another `mlplatform cluster up` or `down` of '{name}' is in progress "
                f"({storage.lock_holder(lock)}); wait for it to finish, or stop it, then try again."
            ) from None
        yield


def _write_state(cluster: LocalCluster) -> None:
    storage.atomic_write(_cluster_dir(cluster.name) / "state.json", json.dumps(asdict(cluster), indent=2))


def _read_state(path: Path) -> LocalCluster | None:
    try:
        data = json.loads(path.read_text())
        data["nodes"] = tuple(NodeProcess(**n) for n in data["nodes"])
        return LocalCluster(**data)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise ClusterError(
            f"Cluster state {path} is unreadable ({e}). If no such cluster runs, delete the file."
        ) from None

