"""Per-request work off the critical path: remembered keys, buffered metrics, vectorised and sampled
drift; and the cluster-wide Serve switches and per-app logging that go with them."""

import asyncio

import numpy as np
import pytest

from mlplatform.cluster.spec import ClusterSpec
from mlplatform.serve import create_key, revoke_key
from mlplatform.serve import _keys
from mlplatform.serve._drift import DriftMonitor
from mlplatform.serve._metrics import _Buffer, _Buffered
from mlplatform.serve._spec import ServeSpec


def test_a_repeat_key_is_not_hashed_again_until_its_file_changes(tmp_path, monkeypatch):
    made = create_key("digits", keys_dir=tmp_path)
    checker = _keys.KeyChecker("digits", tmp_path, recheck_s=0)  # re-stat the file on every check
    hashed = []
    original = _keys._digest
    monkeypatch.setattr(_keys, "_digest", lambda salt, secret: hashed.append(1) or original(salt, secret))

    async def checks(n):
        return [(await checker.check(made.key)).outcome for _ in range(n)]

    assert asyncio.run(checks(5)) == ["ok"] * 5
    assert len(hashed) == 1
    revoke_key("digits", made.record.key_id, keys_dir=tmp_path)  # a new file version: verified afresh
    assert asyncio.run(checks(2)) == ["revoked"] * 2
    assert len(hashed) == 2
    # A wrong secret for a remembered key id is still refused (it is another presented string).
    assert asyncio.run(checker.check(made.key[:-1] + "x")).outcome == "invalid"


def test_the_background_refresher_sees_a_revocation_without_a_request_reading_the_file(tmp_path):
    made = create_key("digits", keys_dir=tmp_path)
    checker = _keys.KeyChecker("digits", tmp_path, recheck_s=0.2)

    async def scenario():
        first = (await checker.check(made.key)).outcome
        revoke_key("digits", made.record.key_id, keys_dir=tmp_path)
        await asyncio.sleep(0.5)  # the refresher re-reads every recheck_s / 2
        reads = []
        original = checker._load
        checker._load = lambda *a: reads.append(1) or original(*a)
        second = (await checker.check(made.key)).outcome
        return first, second, reads

    first, second, reads = asyncio.run(scenario())
    assert (first, second) == ("ok", "revoked")
    assert reads == []  # the request found the file already fresh


class _Recorder:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags=None):
        self.calls.append(("inc", value, tags))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, tags))


def test_metric_updates_are_summed_locally_and_handed_to_ray_in_one_flush():
    buffer, counter, histogram = _Buffer(flush_s=3600), _Recorder(), _Recorder()
    requests, latency = _Buffered(counter, buffer), _Buffered(histogram, buffer)
    for code in ("200", "200", "200", "422"):
        requests.inc(tags={"app": "a", "code": code})
    latency.observe(3.0, tags={"app": "a"})
    latency.observe(7.0, tags={"app": "a"})
    assert counter.calls == histogram.calls == []  # nothing on the request path
    buffer.flush()
    assert sorted(counter.calls, key=str) == [("inc", 1.0, {"app": "a", "code": "422"}),
                                              ("inc", 3.0, {"app": "a", "code": "200"})]
    assert histogram.calls == [("observe", 3.0, {"app": "a"}), ("observe", 7.0, {"app": "a"})]
    buffer.flush()
    assert len(counter.calls) == 2  # flushed values are not sent twice


def test_the_flusher_runs_on_the_event_loop_and_flushes_when_the_loop_ends():
    buffer, counter = _Buffer(flush_s=0.05), _Recorder()

    async def serve():
        _Buffered(counter, buffer).inc(tags={"app": "a"})
        await asyncio.sleep(0.2)
        flushed_in_time = len(counter.calls)
        _Buffered(counter, buffer).inc(2.0, tags={"app": "a"})  # left for the flush at shutdown
        return flushed_in_time

    assert asyncio.run(serve()) == 1
    assert [c[1] for c in counter.calls] == [1.0, 2.0]


def _per_feature_counts(reference, rows):
    # The definition: one searchsorted per feature against the reference's decile edges.
    monitor = DriftMonitor(reference, window_rows=10**9)
    return [np.bincount(np.searchsorted(e, rows[:, j], side="right"), minlength=len(e) + 1)
            for j, e in enumerate(monitor.edges)]


def test_vectorised_binning_matches_searchsorted_per_feature():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 17, (400, 12)).astype(float)
    reference[:, 0] = 0  # a constant pixel: its bins collapse to one edge
    rows = np.concatenate([rng.integers(0, 17, (50, 12)), np.full((1, 12), 99)]).astype(np.float32)
    monitor = DriftMonitor(reference, window_rows=10**9)
    monitor.observe(rows)
    for j, expected in enumerate(_per_feature_counts(reference, rows)):
        assert monitor._counts[j, :len(expected)].tolist() == expected.tolist()
        assert monitor._counts[j, len(expected):].sum() == 0


def test_sample_rate_bins_about_that_fraction_of_batches():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(rng.normal(size=(500, 3)), window_rows=10**9, sample_rate=0.25, seed=0)
    for _ in range(2000):
        monitor.observe(rng.normal(size=(1, 3)))
    assert 400 < monitor._rows < 600


def test_cluster_spec_states_serves_switches_for_every_node():
    head = {"name": "head", "cpus": 2, "memory_gb": 4, "region": "me-central-1", "zone": "me-central-1a"}
    off = ClusterSpec.model_validate({"name": "c", "head": head})  # measured: no gain through the proxy
    assert off.serve.node_env().items() >= {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                                            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}.items()
    on = ClusterSpec.model_validate({"name": "c", "head": head, "serve": {"throughput_optimized": True}})
    # 2.60's throughput mode would turn direct ingress on by itself: the spec keeps it off unless asked
    assert on.serve.node_env().items() >= {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                                           "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}.items()
    direct = ClusterSpec.model_validate({"name": "c", "head": head, "serve": {"direct_ingress": True}})
    assert direct.serve.node_env()["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    with pytest.raises(ValueError, match="throughput"):
        ClusterSpec.model_validate({"name": "c", "head": head, "serve": {"throughput": True}})


def test_serve_spec_logging_defaults_to_no_access_log_and_checks_the_level():
    base = {"name": "digits", "model": "digits@production", "registry_root": "/tmp/r"}
    spec = ServeSpec.model_validate(base)
    assert (spec.logging.access_log, spec.logging.level) == (False, "INFO")
    assert ServeSpec.model_validate({**base, "logging": {"access_log": True, "level": "WARNING"}}).logging.access_log
    with pytest.raises(ValueError, match="level"):
        ServeSpec.model_validate({**base, "logging": {"level": "LOUD"}})
    with pytest.raises(ValueError, match="sample_rate"):
        ServeSpec.model_validate({**base, "drift": {"sample_rate": 0}})
