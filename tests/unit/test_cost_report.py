"""Cost reports from the ledger (by job, trial, deployment, region, market) and `mlplatform cost`."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from mlplatform._internal import metadata
from mlplatform.cli import main
from mlplatform.cost import catalog
from mlplatform.cost.ledger import Lost, Usage, open_ledger
from mlplatform.cost.report import format_table, report
from mlplatform.errors import CostError

TUNE, SERVE = "01000000", "02000000"


def usage(item: str, job: str, *, trial=None, deployment=None, region="me-central-1", market="spot", cpus=1.0,
          gpus=0.0, seconds=3600.0, cost=1.0, currency="USD", cluster="three-region") -> Usage:
    return Usage(cluster=cluster, item_id=item, job_id=job, kind="actor", name=item, trial=trial,
                 deployment=deployment, node_id="n" * 56, region=region, node_group="gpu", market=market, cpus=cpus,
                 gpus=gpus, share=0.5, started_at=0.0, ended_at=seconds, seconds=seconds, price_per_hour=2.0,
                 cost=cost, currency=currency, preempted=False)


@pytest.fixture
def ledger(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(metadata.URL_ENV, raising=False)
    return open_ledger()


@pytest.fixture
def filled(ledger):
    ledger.record([
        usage("driver", TUNE, cost=0.25, market="on-demand"),
        usage("t1-w0", TUNE, trial="t1", cpus=2.0, gpus=1.0, cost=1.0),
        usage("t1-w1", TUNE, trial="t1", cpus=2.0, gpus=1.0, seconds=1800.0, cost=0.5),
        usage("t2-w0", TUNE, trial="t2", cost=3.0),
        usage("replica", SERVE, deployment="model", region="eu-central-1", market="on-demand", cost=0.5),
    ])
    ledger.record_lost([
        Lost(cluster="three-region", job_id=TUNE, trial="t1", steps=40, seconds=600.0, cost=0.2, currency="USD",
             reason="preempted", at=100.0),
        Lost(cluster="three-region", job_id=TUNE, trial="t3", steps=5, seconds=60.0, cost=0.05, currency="USD",
             reason="preempted", at=200.0),
    ])
    return ledger


def test_by_job(filled):
    out = report(filled)
    assert out["currency"] == "USD" and out["by"] == "job"
    assert [r["key"] for r in out["rows"]] == [TUNE, SERVE]  # most expensive first
    tune = out["rows"][0]
    assert tune["cost"] == pytest.approx(4.75) and tune["lost_cost"] == pytest.approx(0.25)
    assert tune["cpu_seconds"] == pytest.approx(3600 + 2 * 3600 + 2 * 1800 + 3600)
    assert tune["gpu_seconds"] == pytest.approx(3600 + 1800)
    assert tune["markets"] == ["on-demand", "spot"] and tune["regions"] == ["me-central-1"] and tune["items"] == 4
    assert tune["job_id"] == TUNE
    total = out["total"]
    assert total["cost"] == pytest.approx(5.25) and total["lost_cost"] == pytest.approx(0.25)
    assert total["items"] == 5 and total["jobs"] == 2 and total["regions"] == ["eu-central-1", "me-central-1"]
    json.dumps(out)  # JSON-able


def test_by_trial_groups_items_without_a_trial_under_job_and_carries_the_job(filled):
    rows = {r["key"]: r for r in report(filled, job=TUNE, by="trial")["rows"]}
    assert set(rows) == {"(job)", "t1", "t2", "t3"}
    assert all(r["job_id"] == TUNE for r in rows.values())
    assert rows["t1"]["cost"] == pytest.approx(1.5) and rows["t1"]["lost_cost"] == pytest.approx(0.2)
    assert rows["t3"]["items"] == 0 and rows["t3"]["lost_cost"] == pytest.approx(0.05)  # lost all its work
    assert rows["(job)"]["cost"] == pytest.approx(0.25)


@pytest.mark.parametrize("by,costs", [
    ("deployment", {"(job)": 4.75, "model": 0.5}),
    ("region", {"me-central-1": 4.75, "eu-central-1": 0.5}),
    ("market", {"spot": 4.5, "on-demand": 0.75}),
])
def test_other_groupings_add_up_to_the_total(filled, by, costs):
    out = report(filled, by=by)
    assert {r["key"]: pytest.approx(r["cost"]) for r in out["rows"]} == costs
    assert sum(r["cost"] for r in out["rows"]) == pytest.approx(out["total"]["cost"])


def test_market_rows_name_their_job_only_when_it_is_one(filled):
    rows = {r["key"]: r for r in report(filled, by="market")["rows"]}
    assert rows["spot"]["job_id"] == TUNE and rows["on-demand"]["job_id"] is None


def test_bad_by_lists_the_choices(filled):
    with pytest.raises(CostError, match="Got 'node' for `by`; must be one of job, trial, deployment, region, market"):
        report(filled, by="node")


def test_empty_ledger_reports_nothing_without_failing(ledger):
    out = report(ledger, job="ffff")
    assert out["rows"] == [] and out["total"]["cost"] == 0 and out["total"]["items"] == 0
    assert out["currency"] is None
    assert format_table(out) == "No costs recorded for job ffff."


def test_mixed_currencies_are_refused_with_a_way_out(ledger):
    ledger.record([usage("a", TUNE), usage("b", SERVE, currency="AED", cluster="other")])
    with pytest.raises(CostError, match="AED, USD.*--cluster NAME"):
        report(ledger)
    assert report(ledger, cluster="other")["currency"] == "AED"


def test_table_has_a_row_per_group_and_a_total(filled):
    text = format_table(report(filled, by="trial"))
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["TRIAL", "JOB", "COST", "USD"]
    assert lines[-1].startswith("TOTAL") and "5.2500" in lines[-1]
    assert len(lines) == 1 + 5 + 1  # header, (job) t1 t2 t3 of the tune job, (job) of the serve job, total


# --- the CLI --------------------------------------------------------------------------


def test_cli_report_json_and_table(filled, capsys):
    assert main(["cost", "report", "--json", "--by", "trial", "--job", TUNE, "--cluster", "three-region"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["by"] == "trial" and {r["key"] for r in out["rows"]} == {"(job)", "t1", "t2", "t3"}
    assert main(["cost", "report"]) == 0
    text = capsys.readouterr().out
    assert TUNE in text and SERVE in text and "TOTAL" in text


def test_cli_report_on_an_empty_ledger(ledger, capsys):
    assert main(["cost", "report", "--cluster", "nowhere"]) == 0
    assert "No costs recorded for cluster nowhere." in capsys.readouterr().out


def test_cli_bad_by_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["cost", "report", "--by", "node"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_cli_catalog(capsys, monkeypatch):
    assert main(["cost", "catalog", "--config", str(REPO / "cluster_configs/prices/example.yaml")]) == 0
    out = capsys.readouterr().out
    assert "EXAMPLE figures" in out and "me-central-1  gpu" in out and "Off-peak: 22:00-06:00 Asia/Dubai" in out
    monkeypatch.delenv(catalog.CATALOG_ENV, raising=False)
    assert main(["cost", "catalog"]) == 1
    assert "pass --config FILE" in capsys.readouterr().err


def test_metrics_tags_from_report_rows():
    from mlplatform.cost import metrics

    assert metrics.tags({"job_id": TUNE, "key": "t1", "markets": ["spot"], "regions": ["a", "b"]}, "USD") == {
        "job": TUNE, "trial": "t1", "market": "spot", "region": "a,b", "currency": "USD"}


def test_a_ray_job_id_names_the_newest_cluster_runs_job(tmp_path):
    """Ray numbers jobs afresh per cluster run: `--job 05000000` is the newest run's 05000000."""
    from mlplatform.cost.ledger import Usage, open_ledger
    from mlplatform.cost.report import report

    ledger = open_ledger(f"sqlite:///{tmp_path}/ledger.db")

    def usage(job: str, item: str, started: float, cost: float) -> Usage:
        return Usage(cluster="c", item_id=item, job_id=job, kind="actor", name="w", node_id="n", region="r",
                     node_group="g", market="spot", cpus=1.0, gpus=0.0, share=0.5, started_at=started,
                     ended_at=started + 10, seconds=10.0, price_per_hour=1.0, cost=cost, currency="USD")

    ledger.record([usage("05000000@2026-11-26_10-00-00", "a", 1000.0, 1.0),
                   usage("05000000@2026-11-27_02-19-02", "b", 2000.0, 2.0)])
    out = report(ledger, cluster="c", job="05000000")
    assert out["job"] == "05000000@2026-11-27_02-19-02" and out["total"]["cost"] == 2.0
    assert report(ledger, cluster="c", job="05000000@2026-11-26_10-00-00")["total"]["cost"] == 1.0
