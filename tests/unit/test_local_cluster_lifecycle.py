"""Local cluster lifecycle without Ray: port checks, the `up`/`down` lock, nodes that will not stop.

The same paths with real `ray start` nodes (a killed `up`, `down` then `up` at once) are in
tests/integration/test_local_cluster.py.
"""

import fcntl
import json
import socket
import subprocess
import time

import psutil
import pytest

from mlplatform import cluster, config
from mlplatform.cluster import local
from mlplatform.errors import ClusterBusy, ClusterError, PortInUse

SPEC = {"name": "lc", "head": {"name": "head", "cpus": 1, "memory_gb": 1, "region": "r", "zone": "z"}}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    return tmp_path


def _port_in_time_wait() -> int:
    """A port whose only socket is a closed connection in TIME_WAIT, as `down` leaves the GCS port.

    The server closes first (as a stopped node does), so its side of the connection waits.
    """
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray's servers bind
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()
    client.recv(1)  # the server's FIN has arrived
    client.close()
    server.close()
    return port


def _plain_bind_fails(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def test_a_port_in_time_wait_is_free_for_the_next_up():
    port = _port_in_time_wait()
    deadline = time.monotonic() + 5
    while not _plain_bind_fails(port) and time.monotonic() < deadline:  # the last ACK may still be on its way
        time.sleep(0.05)
    assert _plain_bind_fails(port), "precondition: the port is in TIME_WAIT"
    assert local._port_free(port)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_listening_port_is_taken(host):
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, 0))
        listener.listen()
        assert not local._port_free(listener.getsockname()[1])


@pytest.mark.timeout(30)  # the unbounded search never returned
def test_free_port_gives_up_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(local, "_port_free", lambda port: False)
    with pytest.raises(PortInUse, match=r"no free port .* in 20000-32767 after 200 random tries.*`ss -ltn`"):
        local._free_port()


def _hold_lock(home, name: str):
    cdir = home / "clusters" / name
    cdir.mkdir(parents=True, exist_ok=True)
    f = open(cdir / "lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_up_while_another_up_holds_the_lock_is_refused(home, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("a node was started while another `up` held the lock")

    monkeypatch.setattr(local, "_spawn", never)
    spec = config.validate(SPEC, cluster.ClusterSpec, "test")
    with _hold_lock(home, "lc"):
        with pytest.raises(ClusterBusy, match=r"Another `mlplatform cluster up` or `down` of 'lc' is in progress"):
            cluster.up(spec)
    assert not (home / "clusters" / "lc" / "state.json").exists()


@pytest.fixture
def unstoppable(home, monkeypatch):
    """A recorded cluster whose one node (a real process group) ignores every signal we send."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    node = local.NodeProcess("head", "head", proc.pid, psutil.Process(proc.pid).create_time(), "")
    running = local.LocalCluster("lc", "", "127.0.0.1:1", "http://127.0.0.1:2", "ray://127.0.0.1:3",
                                 str(home / "token"), str(home / "tmp"), (node,))
    (home / "clusters" / "lc").mkdir(parents=True)
    local._write_state(running)
    monkeypatch.setattr(local, "_signal_group", lambda pgid, sig: None)  # as for another user's process
    monkeypatch.setattr(local, "_STOP_GRACE_S", 0.5)
    monkeypatch.setattr(local, "_KILL_WAIT_S", 0.5)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_down_keeps_the_state_of_a_node_it_could_not_stop(home, unstoppable):
    state = home / "clusters" / "lc" / "state.json"
    with pytest.raises(ClusterError, match=rf"Could not stop node\(s\) head \(process group {unstoppable.pid}\) "
                                           r"of cluster 'lc'; its state is kept"):
        cluster.down("lc")
    assert [n["pid"] for n in json.loads(state.read_text())["nodes"]] == [unstoppable.pid]
    assert local.find("lc").nodes[0].pid == unstoppable.pid  # still tracked, so `down` can run again


def test_down_while_an_up_holds_the_lock_is_refused(home, unstoppable):
    with _hold_lock(home, "lc"):
        with pytest.raises(ClusterBusy, match="in progress"):
            cluster.down("lc")
    assert unstoppable.poll() is None and (home / "clusters" / "lc" / "state.json").exists()
