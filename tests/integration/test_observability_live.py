"""Every PromQL expression of the shipped Grafana dashboard answers on a live cluster.

A real Prometheus (tests/prometheus.py) scrapes the session's three-region cluster while
traffic exercises every panel: a one-trial cost-aware search (a Ray Train run, so training
metrics too; its driver publishes the trial's cost), a residency denial, and Serve requests
(good, unauthenticated, malformed). `trained_digits` adds a finished training job's
residency sweep. Each expression then goes through Prometheus' /api/v1/query: none may
error, and each must return data at some moment since the traffic began (as a dashboard
over that time range would show): gauges of exited processes go after ~20 s, so "now"
alone would miss a finished trial's loss.

Slow (~4-6 min on 2 cores, most of it the search's Ray Train run): `make test-slow`.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from conftest import REPO
from prometheus import query, server
from serve_models import digits_data, register_digits, serve_on_free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DASHBOARD = REPO / "cluster_configs/observability/grafana-dashboard.json"


def _search(folder):
    """jobs/configs/tune-digits.yaml cut to one short trial, with its money budget kept."""
    body = yaml.safe_load((REPO / "jobs/configs/tune-digits.yaml").read_text())
    body.update({"name": f"obs-{uuid.uuid4().hex[:6]}", "train": str(REPO / "jobs/configs/digits.yaml"),
                 "storage_path": str(folder), "num_samples": 1, "max_concurrent_trials": 1,
                 "searcher": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
                 "objective": {"kind": "max_metric"}})
    body.pop("register", None)
    body["overrides"] = {**body["overrides"], "epochs": 1}
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _denied_training(folder):
    """The shipped digits spec (uae-restricted data) asked onto the EU node: refused before it runs."""
    from mlplatform import config
    from mlplatform.errors import ResidencyError
    from mlplatform.train import TrainSpec, train

    spec = config.load(REPO / "jobs/configs/digits.yaml", TrainSpec)
    placement = spec.placement.model_copy(update={"label_selector": {"ray.io/availability-region": "eu-central-1"}})
    spec = spec.model_copy(update={"name": "obs-denied", "storage_path": str(folder), "placement": placement})
    with pytest.raises(ResidencyError):
        train(spec)


def _serve_traffic(cluster, folder) -> None:
    from ray import serve

    from mlplatform.serve import build_app, create_key

    root, keys = folder / "registry", folder / "keys"
    register_digits(root, folder / "artifacts")
    port = serve_on_free_port(cluster)
    serve.run(build_app({
        "name": "observed", "model": "digits@production", "registry_root": str(root),
        "primary": {"replicas": 1, "num_cpus": 0.5, "label_selector": {"ray.io/node-group": "cpu"},
                    "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.02}},
        "ingress": {"replicas": 1, "num_cpus": 0.1}, "auth": {"keys_dir": str(keys)}, "limits": {"max_rows": 16},
    }), name="observed", route_prefix="/")
    key = create_key("observed", keys_dir=keys).key
    url = f"https://127.0.0.1:{port}/v1/predict"
    x, _ = digits_data()
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda i: requests.post(url, json={"inputs": [x[i].tolist()]}, timeout=30,
                                                      headers={"X-API-Key": key}).status_code, range(40)))
    assert set(codes) == {200}
    assert requests.post(url, json={"inputs": [[0.0] * 3]}, headers={"X-API-Key": key}, timeout=30).status_code == 422
    assert requests.post(url, json={"inputs": [x[0].tolist()]}, timeout=30).status_code == 401


def _answers(url: str, expr: str, since: float) -> bool:
    """Whether `expr` returns data now or at any 5 s step back to `since` (a query error raises)."""
    at = time.time()
    while at >= since:
        if query(url, expr, at):
            return True
        at -= 5
    return False


def test_every_dashboard_expression_answers_after_traffic(three_region_cluster, trained_digits, restricted_tmp,
                                                          internal_root, tmp_path):
    import ray

    from mlplatform import config
    from mlplatform.cluster import connect
    from mlplatform.observability import check_dashboard, dashboard
    from mlplatform.observability.check import expressions, substitute
    from mlplatform.tune import TuneSpec, tune

    model = json.loads(DASHBOARD.read_text())
    check_dashboard(model)
    began = time.time()
    with server(three_region_cluster, tmp_path) as url:
        connect(three_region_cluster.name)
        try:
            spec_path = _search(restricted_tmp)
            result = tune(config.load(spec_path, TuneSpec), str(spec_path))
            assert len(result.trials) == 1
            _denied_training(restricted_tmp)
            # A connected process may write unclassified (internal) data only under the policy's prefix.
            _serve_traffic(three_region_cluster, Path(tempfile.mkdtemp(dir=internal_root)))
            # Each process exports every 10 s: give the last traffic's series time to reach Prometheus.
            pending = {(title, ref): substitute(expr, dashboard.VARIABLES) for title, ref, expr in expressions(model)}
            deadline = time.time() + 90
            while pending and time.time() < deadline:
                for (title, ref), promql in list(pending.items()):
                    try:
                        if _answers(url, promql, began):
                            del pending[(title, ref)]
                    except AssertionError as e:  # a query Prometheus refuses fails at once
                        raise AssertionError(f"panel {title!r} ({ref}): {e}") from None
                time.sleep(5 if pending else 0)
            failures = [f"panel {t!r} ({r}): no data since the traffic began: {q}" for (t, r), q in pending.items()]
            assert not failures, "\n".join(failures)
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
