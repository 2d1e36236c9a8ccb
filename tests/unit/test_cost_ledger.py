"""The cost ledger in the metadata store, on SQLite and on PostgreSQL: upserts, idempotent losses, jobs."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from mlplatform import cost
from mlplatform._internal import metadata
from mlplatform.cost.ledger import DB_FILE, Ledger, Lost, Usage, open_ledger
from mlplatform.errors import CostError

pytestmark = pytest.mark.usefixtures("metadata_backend")


@pytest.fixture
def cluster(tmp_path) -> str:
    # PostgreSQL is one database for the whole session: each test keeps to a cluster of its own.
    return f"c-{tmp_path.name}"


@pytest.fixture
def ledger(tmp_path, monkeypatch) -> Ledger:
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    return open_ledger()


def usage(cluster: str, item: str, **over) -> Usage:
    fields = dict(cluster=cluster, item_id=item, job_id="01000000", kind="actor", name="TrainWorker",
                  trial=None, deployment=None, node_id="n" * 56, region="me-central-1", node_group="gpu",
                  market="spot", cpus=1.0, gpus=0.0, share=0.5, started_at=1000.0, ended_at=None, seconds=60.0,
                  price_per_hour=0.55, cost=0.5 * 0.55 * 60 / 3600, currency="USD", preempted=False)
    return Usage(**{**fields, **over})


def test_usage_fields_are_exactly_the_table_columns():
    from mlplatform._internal.metadata import tables as t

    assert [f.name for f in dataclasses.fields(Usage)] == [c.name for c in t.cost_usage.columns]
    assert [f.name for f in dataclasses.fields(Lost)] == [c.name for c in t.cost_lost.columns if c.name != "seq"]


def test_default_ledger_is_sqlite_under_home_unless_a_url_is_set(ledger, tmp_path, metadata_backend):
    if metadata_backend == "sqlite":
        assert (tmp_path / "home" / DB_FILE).exists() and "sqlite" in repr(ledger)
    else:
        assert "postgresql" in repr(ledger)


def test_recording_again_replaces_an_items_row(ledger, cluster):
    assert ledger.record([usage(cluster, "a1"), usage(cluster, "t1", kind="task", seconds=5.0)]) == 2
    ledger.record([usage(cluster, "a1", seconds=120.0, ended_at=1120.0, cost=0.02, preempted=True)])
    rows = {u.item_id: u for u in ledger.usages(cluster)}
    assert set(rows) == {"a1", "t1"}
    assert rows["a1"] == usage(cluster, "a1", seconds=120.0, ended_at=1120.0, cost=0.02, preempted=True)
    assert rows["t1"].kind == "task" and rows["t1"].ended_at is None and rows["t1"].preempted is False
    assert ledger.record([]) == 0


def test_filters_by_cluster_and_job(ledger, cluster):
    ledger.record([usage(cluster, "a"), usage(cluster, "b", job_id="02000000"), usage(cluster + "x", "a")])
    assert [u.item_id for u in ledger.usages(cluster, "02000000")] == ["b"]
    assert len(ledger.usages(cluster)) == 2
    assert {u.cluster for u in ledger.usages(job_id="01000000")} >= {cluster, cluster + "x"}


def test_a_loss_recorded_twice_is_kept_once_with_or_without_a_trial(ledger, cluster):
    loss = Lost(cluster=cluster, job_id="01000000", trial=None, steps=40, seconds=30.0, cost=0.01,
                currency="USD", reason="spot preemption of node gpu-0", at=2000.0)
    assert ledger.record_lost(loss) == 1
    assert ledger.record_lost(loss) == 0
    in_trial = dataclasses.replace(loss, trial="trial_0001")
    assert ledger.record_lost([in_trial, in_trial, dataclasses.replace(loss, at=2500.0)]) == 2
    assert ledger.lost(cluster) == [loss, in_trial, dataclasses.replace(loss, at=2500.0)]
    assert ledger.lost(cluster, job_id="09000000") == []


def test_jobs_are_upserted_keeping_what_is_not_given_again(ledger, cluster):
    ledger.record_job(cluster, "01000000", "tune", "digits-sweep", started_at=10.0, extra={"trials": 8})
    ledger.record_job(cluster, "01000000", "tune", "digits-sweep", ended_at=99.0)
    [job] = ledger.jobs(cluster)
    assert (job.kind, job.name, job.started_at, job.ended_at, job.extra) == ("tune", "digits-sweep", 10.0, 99.0,
                                                                             {"trials": 8})
    with pytest.raises(CostError, match="`kind` of job 02000000; must be one of train, tune, serve, other"):
        ledger.record_job(cluster, "02000000", "batch", "x")


@pytest.mark.parametrize("over,message", [
    ({"kind": "replica"}, "`kind` of item a; must be one of actor, task"),
    ({"market": "reserved"}, "`market` of item a; must be spot or on-demand"),
    ({"cost": -1.0}, "`cost` of item a; must be >= 0"),
])
def test_bad_usage_is_refused_and_nothing_is_written(ledger, cluster, over, message):
    with pytest.raises(CostError, match=message):
        ledger.record([usage(cluster, "ok"), usage(cluster, "a", **over)])
    assert ledger.usages(cluster) == []


def test_the_schema_has_the_ledger_tables_and_index(ledger):
    inspector = sa.inspect(ledger.engine)
    assert {"cost_usage", "cost_lost", "cost_jobs"} <= set(inspector.get_table_names())
    assert "ix_cost_usage_job" in {i["name"] for i in inspector.get_indexes("cost_usage")}


def test_package_exports(ledger):
    assert cost.open_ledger is open_ledger and cost.Usage is Usage and cost.Lost is Lost
    assert metadata.URL_ENV == "MLPLATFORM_METADATA_URL"
