"""A real Prometheus server (Debian's package) scraping a live local cluster, for the metrics tests.

Its config is mlplatform.observability.prometheus's, pointed at the cluster's discovery files,
on loopback, scraping every second: gauges of an exited process stay only ~20 s in Ray's
agents, and a test's short jobs must still be seen. Skipped without the binary, except in CI
(CI=true), where a missing binary fails the suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from conftest import free_port
from mlplatform.observability import prometheus as prom_config


@contextmanager
def server(cluster, folder: Path) -> Iterator[str]:
    """Prometheus scraping every node of `cluster`; its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        needs = "the `prometheus` binary (apt-get install prometheus; `make test` does it)"
        if os.environ.get("CI", "").lower() == "true":  # CI must test the metrics path, not skip it
            pytest.fail(f"CI=true and no {needs}")
        pytest.skip(f"Requires: {needs}")
    files = sorted(str(p) for p in Path(cluster.temp_dir).glob(f"*/session_latest/{prom_config.DISCOVERY}"))
    assert files, f"no {prom_config.DISCOVERY} under {cluster.temp_dir}"
    port = free_port()
    (folder / "prometheus.yml").write_text(prom_config.dumps(prom_config.config(files, "1s", loopback=True)))
    log_path = folder / "prometheus.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while not _ready(url):
            assert process.poll() is None, log_path.read_text()[-2000:]
            if time.time() > deadline:
                pytest.fail(f"Prometheus at {url} not ready after 30 s; its log ends: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False


def query(url: str, promql: str, at: float | None = None) -> list[dict]:
    """An instant query's result (`at`: evaluation time, unix s; default now). Raises on a query error."""
    params = {"query": promql, **({"time": f"{at:.3f}"} if at is not None else {})}
    r = requests.get(url + "/api/v1/query", params=params, timeout=10)
    if r.status_code != 200:
        raise AssertionError(f"Prometheus refused {promql!r}: HTTP {r.status_code} {r.text[:500]}")
    return r.json()["data"]["result"]


def until(url: str, promql: str, want=bool, timeout: float = 90) -> list[dict]:
    """The query's result once `want(result)` holds (Ray exports every few seconds, so a series
    may first appear with only part of the traffic counted)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = query(url, promql)
        if result and want(result):
            return result
        time.sleep(2)
    names = query(url, 'count by (__name__) ({__name__=~".*mlplatform.*"})')
    raise AssertionError(f"Prometheus never answered {promql!r}; mlplatform series it has: "
                         f"{sorted(n['metric']['__name__'] for n in names)}")
