"""Shared fixtures: one real multi-node Ray cluster per session, started by `cluster up`.

Tests never touch the user's ~/.mlplatform or the shipped ports: the session gets its
own MLPLATFORM_HOME and the three-region spec is started on free ports.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Set before any test imports mlplatform.cluster, so every state file lands here.
os.environ.setdefault("MLPLATFORM_HOME", tempfile.mkdtemp(prefix="mlplatform-test-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_job(cluster, *args: str, timeout_s: float = 800) -> str:
    """`ray job submit --working-dir . -- python ARGS` on `cluster`, as the README writes it; its stdout."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    result = subprocess.run(
        [ray_cli, "job", "submit", "--working-dir", ".", "--", "python", *args],
        cwd=REPO, env={**os.environ, **cluster.env()}, capture_output=True, text=True, timeout=timeout_s,
    )
    assert result.returncode == 0 and "succeeded" in result.stdout, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def job_placements(cluster, job_id: str) -> list[tuple[str, str]]:
    """(name, region) of every task and actor of a job, as Ray's state API reports them."""
    import ray
    from ray.util.state import list_actors, list_tasks

    from mlplatform.cluster import connect, inventory

    region_of = {n.node_id: n.labels["ray.io/availability-region"] for n in inventory(cluster.name)}
    connect(cluster.name)
    try:
        job = [("job_id", "=", job_id)]
        actors = list_actors(filters=job, detail=True, limit=10_000, raise_on_missing_output=False)
        tasks = list_tasks(filters=job, detail=True, limit=10_000, raise_on_missing_output=False)
    finally:
        ray.shutdown()
    placed = [(a.class_name, region_of[a.node_id]) for a in actors if a.node_id]
    return placed + [(t.name, region_of[t.node_id]) for t in tasks if t.node_id]


def with_free_ports(spec):
    """The same cluster spec, moved to ports no other cluster on this machine uses."""
    ports = spec.ports.model_copy(update={"gcs": free_port(), "dashboard": free_port(), "client_server": free_port()})
    return spec.model_copy(update={"ports": ports})


def run_together(target, args: list[tuple], timeout_s: float = 120) -> None:
    """Run `target(*a, barrier)` in one spawned process per `a`, released together by the barrier
    so their work really overlaps; every process must exit 0."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    procs = [ctx.Process(target=target, args=(*a, barrier)) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    assert [p.exitcode for p in procs] == [0] * len(procs)


# Every test's captured log records and stderr, for the secret scan that runs last among the
# integration tests (tests/integration/test_zz_no_secrets_in_logs.py). Stdout is left out:
# `serve keys create` prints its key there by design.
PYTEST_LOG = Path(tempfile.mkdtemp(prefix="mlp-pytest-logs-")) / "captured.log"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    kept = [(name, text) for name, text in report.sections if name.startswith(("Captured log", "Captured stderr"))]
    if kept:
        with open(PYTEST_LOG, "a") as f:
            for name, text in kept:
                f.write(f"=== {report.nodeid} {name}\n{text}\n")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="Requires: CUDA"))


@contextmanager
def local_cluster(path: Path) -> Iterator["LocalCluster"]:  # noqa: F821
    """The cluster spec at `path`, started on free ports; stopped (this process disconnected) after."""
    from mlplatform import cluster, config

    spec = with_free_ports(config.load(path, cluster.ClusterSpec))
    running = cluster.up(spec, str(path))
    try:
        yield running
    finally:
        import ray

        ray.shutdown()
        cluster.down(spec.name)


def uae_test_policy(restricted_prefix: Path):
    """A UAE-like policy whose `uae-restricted` data may only be written under `restricted_prefix`."""
    from mlplatform.residency import ResidencyPolicy

    return ResidencyPolicy.model_validate({
        "name": "test-uae", "default_classification": "internal",
        "classifications": {
            "uae-restricted": {"regions": ["me-central-1"], "storage_prefixes": [str(restricted_prefix)],
                               "encrypt_at_rest": True},
            "internal": {"regions": ["me-central-1", "eu-central-1"]},
            "public": {"regions": ["*"]},
        },
    })


_CLUSTER_POINTERS = ("RAY_ADDRESS", "MLPLATFORM_CLUSTER")


def _off_the_cluster(node, monkeypatch) -> None:
    """An integration test earlier in the session may have left this process connected to the
    session's cluster (ray.init) or pointed at it (RAY_ADDRESS, MLPLATFORM_CLUSTER): for a unit
    test the residency policy, the audit writer and export's driver check would then be that
    cluster's, not the test's own."""
    if "unit" not in node.path.parts:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for name in _CLUSTER_POINTERS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="module")
def unit_modules_run_without_a_cluster(request):
    # A unit module's own module-scoped fixtures run before any function-scoped fixture: off the
    # cluster for the whole module too.
    with pytest.MonkeyPatch.context() as mp:
        _off_the_cluster(request.node, mp)
        yield


@pytest.fixture(autouse=True)
def unit_tests_run_without_a_cluster(request, monkeypatch):
    _off_the_cluster(request.node, monkeypatch)


@pytest.fixture(scope="session")
def three_region_cluster() -> Iterator["LocalCluster"]:  # noqa: F821
    """cluster_configs/local/three-region.yaml, running for the whole session."""
    with local_cluster(REPO / "cluster_configs/local/three-region.yaml") as running:
        yield running


@pytest.fixture(scope="session")
def restricted_root() -> Iterator[Path]:
    """A directory of this session's inside the UAE policy's `uae-restricted` storage prefix
    (/tmp/mlplatform/): restricted data (the shipped digits spec's) may be written only there."""
    Path("/tmp/mlplatform").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tests-", dir="/tmp/mlplatform"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def internal_root() -> Iterator[Path]:
    """As restricted_root, inside the `internal` classification's prefix (/tmp/mlplatform-internal/):
    the policy's default, for data a test registers without a classification while connected."""
    Path("/tmp/mlplatform-internal").mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="tests-", dir="/tmp/mlplatform-internal"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def restricted_tmp(restricted_root, request) -> Path:
    """A fresh directory for one test under restricted_root."""
    return Path(tempfile.mkdtemp(prefix=request.node.name[:40] + "-", dir=restricted_root))


@pytest.fixture(scope="session")
def trained_digits(three_region_cluster, restricted_root) -> Path:
    """A digits artifact trained once per session by mlplatform.train on the cluster (the shipped
    config, 2 epochs to keep it cheap), for tests that need what real training writes."""
    import ray

    from mlplatform import config
    from mlplatform.cluster import connect
    from mlplatform.train import TrainSpec, train

    spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
    spec = spec.model_copy(update={"epochs": 2, "storage_path": str(restricted_root / "trained-digits")})
    connect(three_region_cluster.name)
    try:
        return Path(train(spec).artifact_dir)
    finally:
        ray.shutdown()


@pytest.fixture
def ray_on_three_region(three_region_cluster) -> Iterator["LocalCluster"]:  # noqa: F821
    """This test process connected (ray.init) to the three-region cluster."""
    import ray

    from mlplatform.cluster import connect

    connect(three_region_cluster.name)
    try:
        yield three_region_cluster
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A live PostgreSQL server for the whole session (tests/postgres.py); its database URL."""
    from postgres import server

    with server(free_port()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def metadata_backend(request, monkeypatch) -> str:
    """Run the test once on the embedded SQLite store and once on the live PostgreSQL server."""
    from mlplatform._internal import metadata

    if request.param == "postgresql":
        monkeypatch.setenv(metadata.URL_ENV, request.getfixturevalue("postgres_url"))
    else:
        monkeypatch.delenv(metadata.URL_ENV, raising=False)
    return request.param
