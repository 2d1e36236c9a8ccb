"""The price catalog: validation, prices, the share rule, the off-peak window, cluster specs naming it."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest

from conftest import REPO
from mlplatform import config, cost
from mlplatform.cluster.spec import ClusterSpec
from mlplatform.cost import catalog
from mlplatform.errors import CostError, PlatformError, SpecError
from mlplatform.train import TrainSpec

EXAMPLE = REPO / "cluster_configs/prices/example.yaml"
DUBAI = dt.timezone(dt.timedelta(hours=4))


@pytest.fixture(scope="module")
def example() -> catalog.PriceCatalog:
    return catalog.load(EXAMPLE)


def parse(text: str) -> catalog.PriceCatalog:
    return config.parse(textwrap.dedent(text), catalog.PriceCatalog, source="prices.yaml")


BASE = """\
name: t
source: test figures
as_of: 2025-01-01
prices:
  - {region: r1, node_group: cpu, market: on-demand, per_hour: 1.0}
"""


@pytest.mark.parametrize("spec_file", ["dev.yaml", "three-region.yaml"])
def test_example_prices_every_group_of_the_shipped_local_clusters(example, spec_file):
    path = REPO / "cluster_configs/local" / spec_file
    spec = config.load(path, ClusterSpec)
    assert spec.price_catalog == "../prices/example.yaml"
    assert catalog.for_cluster_spec(spec, path) == example
    for group in spec.groups():
        assert example.price(group.region, group.name, group.market) > 0
    assert example.example and example.currency == "USD" and "rounded" in example.source


def test_spot_is_cheaper_than_on_demand_and_off_peak_cheaper_still(example):
    spot = example.price("me-central-1", "gpu", "spot")
    assert spot < example.price("me-central-1", "gpu", "on-demand")
    night = dt.datetime(2025, 6, 1, 23, 30, tzinfo=DUBAI)
    assert example.price("me-central-1", "gpu", "spot", at=night) == pytest.approx(spot * 0.6)
    noon = dt.datetime(2025, 6, 1, 12, 0, tzinfo=DUBAI)
    assert example.price("me-central-1", "gpu", "spot", at=noon) == spot


def test_missing_price_names_group_market_region_catalog_and_fix(example):
    with pytest.raises(CostError) as e:
        example.price("me-central-1", "gpu", "on-demand-ish")
    assert "no price for node group `gpu` (market on-demand-ish, region me-central-1) in catalog example" in str(e.value)
    assert "add an entry under `prices`" in str(e.value)
    assert isinstance(e.value, PlatformError)


def test_a_spec_whose_catalog_misses_a_group_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "prices.yaml").write_text(BASE)
    spec = ClusterSpec(name="c", head={"name": "head", "cpus": 1, "memory_gb": 1, "region": "r1", "zone": "z"},
                       worker_groups=[{"name": "cpu", "cpus": 1, "memory_gb": 1, "region": "r1", "zone": "z",
                                       "market": "on-demand"}],
                       price_catalog="prices.yaml")
    with pytest.raises(CostError, match=r"price_catalog of cluster 'c'.*`head` \(market on-demand, region r1\)"):
        catalog.for_cluster_spec(spec, tmp_path / "cluster.yaml")
    assert catalog.for_cluster_spec(spec.model_copy(update={"price_catalog": None}), None) is None


def test_a_missing_catalog_file_is_named(tmp_path):
    spec = ClusterSpec(name="c", head={"name": "head", "cpus": 1, "memory_gb": 1, "region": "r1", "zone": "z"},
                       price_catalog="nope.yaml")
    with pytest.raises(SpecError, match=r"price_catalog of cluster 'c'.*nope.yaml: no such file"):
        catalog.for_cluster_spec(spec, tmp_path / "cluster.yaml")


@pytest.mark.parametrize("extra,field,message", [
    ("  - {region: r1, node_group: cpu, market: on-demand, per_hour: 2.0}\n", "prices[1]",
     "repeats node group `cpu` (market on-demand, region r1)"),
    ("  - {region: r1, node_group: gpu, market: on-demand, per_hour: 2, preemption_rate_per_hour: 0.1}\n",
     "prices[1]", "on-demand nodes are not preempted"),
    ("  - {region: r1, node_group: gpu, market: spot, per_hour: 0}\n", "prices[1].per_hour", "greater than 0"),
    ("  - {region: r1, node_group: gpu, market: spot, per_hour: 1, preemption_rate_per_hour: 2}\n",
     "prices[1].preemption_rate_per_hour", "less than or equal to 1"),
    ("  - {region: r1, node_group: gpu, market: preemptible, per_hour: 1}\n", "prices[1].market", "'spot' or 'on-demand'"),
    ("off_peak: {timezone: Mars/Olympus, start: '22:00', end: '06:00', price_factor: 0.5}\n",
     "off_peak.timezone", "not an IANA time zone"),
    ("off_peak: {start: '25:00', end: '06:00', price_factor: 0.5}\n", "off_peak.start", "HH:MM"),
    ("off_peak: {start: '06:00', end: '06:00', price_factor: 0.5}\n", "off_peak", "window would be empty"),
    ("off_peak: {start: '22:00', end: '06:00', price_factor: 1.5}\n", "off_peak.price_factor", "less than or equal to 1"),
    ("currency: dollars\n", "currency", "ISO 4217"),
    ("bogus: 1\n", "bogus", "unknown field"),
])
def test_bad_catalogs_are_explained_naming_the_field(extra, field, message):
    with pytest.raises(SpecError) as e:
        parse(BASE + extra)
    assert f"{field} (line" in str(e.value) and message in str(e.value)


def test_share_is_the_larger_of_cpu_and_gpu_fractions_capped_at_one():
    node = {"CPU": 32.0, "GPU": 4.0, "memory": 1e9}
    assert catalog.share({"GPU": 1, "CPU": 1}, node) == 0.25
    assert catalog.share({"CPU": 16}, node) == 0.5
    assert catalog.share({"CPU": 2}, {"CPU": 4}) == 0.5
    assert catalog.share({"CPU": 1, "GPU": 1}, {"CPU": 4, "GPU": 0}) == 0.25  # a node without GPUs
    assert catalog.share({"CPU": 8}, {"CPU": 4}) == 1.0
    assert catalog.share({}, node) == 0.0 and catalog.share({"CPU": 1}, {}) == 0.0
    assert catalog.cost_of(0.25, 2.0, 1800) == pytest.approx(0.25)
    assert "share = max(held CPU / node CPU, held GPU / node GPU)" in catalog.__doc__


def test_off_peak_window_wraps_midnight_in_its_time_zone(example):
    assert example.off_peak.timezone == "Asia/Dubai"
    inside = [dt.datetime(2025, 6, 1, 22, 0, tzinfo=DUBAI), dt.datetime(2025, 6, 2, 5, 59, tzinfo=DUBAI),
              dt.datetime(2025, 6, 1, 18, 30)]  # naive is UTC: 22:30 in Dubai
    outside = [dt.datetime(2025, 6, 1, 6, 0, tzinfo=DUBAI), dt.datetime(2025, 6, 1, 21, 59, tzinfo=DUBAI),
               dt.datetime(2025, 6, 1, 12, 0)]
    assert all(example.in_off_peak(t) for t in inside)
    assert not any(example.in_off_peak(t) for t in outside)
    day = parse(BASE + "off_peak: {timezone: UTC, start: '01:00', end: '05:00', price_factor: 0.5}\n")
    assert day.in_off_peak(dt.datetime(2025, 1, 1, 3)) and not day.in_off_peak(dt.datetime(2025, 1, 1, 5))


def test_next_off_peak(example):
    inside = dt.datetime(2025, 6, 1, 23, 0, tzinfo=DUBAI)
    assert example.next_off_peak(inside) == inside
    noon = dt.datetime(2025, 6, 1, 12, 0, tzinfo=DUBAI)
    assert example.next_off_peak(noon) == dt.datetime(2025, 6, 1, 22, 0, tzinfo=DUBAI)
    utc = dt.datetime(2025, 6, 1, 6, 0, tzinfo=dt.timezone.utc)  # 10:00 in Dubai
    nxt = example.next_off_peak(utc)
    assert nxt == dt.datetime(2025, 6, 1, 18, 0, tzinfo=dt.timezone.utc) and nxt.tzinfo == dt.timezone.utc
    assert example.next_off_peak(dt.datetime(2025, 6, 1, 6, 0)) == dt.datetime(2025, 6, 1, 18, 0)  # naive UTC
    plain = parse(BASE)
    assert not plain.in_off_peak(noon) and plain.off_peak_saving(10.0) == 0.0
    with pytest.raises(CostError, match="no off-peak window.*add `off_peak:`"):
        plain.next_off_peak(noon)


def test_off_peak_saving(example):
    assert example.off_peak_saving() == pytest.approx(0.4)
    assert example.off_peak_saving(10.0) == pytest.approx(4.0)


def test_current_reads_the_file_the_environment_names(monkeypatch, example, tmp_path):
    monkeypatch.delenv(catalog.CATALOG_ENV, raising=False)
    assert cost.current() is None
    monkeypatch.setenv(catalog.CATALOG_ENV, str(EXAMPLE))
    assert cost.current() == example
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    monkeypatch.setenv(catalog.CATALOG_ENV, str(bad))
    with pytest.raises(SpecError, match=catalog.CATALOG_ENV):
        cost.current()


def test_catalog_round_trips_through_its_published_json(example):
    import json

    assert catalog.PriceCatalog.model_validate(json.loads(catalog.encode(example))) == example


def test_train_spec_start_now_or_off_peak():
    import yaml

    base = yaml.safe_load((REPO / "jobs/configs/digits.yaml").read_text())
    base.pop("start", None)
    assert config.validate(base, TrainSpec, "t").start == "now"
    assert config.validate({**base, "start": "off-peak"}, TrainSpec, "t").start == "off-peak"
    with pytest.raises(SpecError, match="start"):
        config.validate({**base, "start": "tonight"}, TrainSpec, "t")


def test_off_peak_start_sleeps_until_the_window_and_says_so(capsys):
    import datetime as dt

    from mlplatform.cost.catalog import load

    prices = load(REPO / "cluster_configs/prices/example.yaml")
    slept: list[float] = []
    # 20:00 in Dubai (16:00 UTC): the shipped window opens at 22:00, two hours later.
    waited = prices.wait_for_off_peak("run", now=dt.datetime(2026, 11, 27, 16, 0, tzinfo=dt.timezone.utc),
                                      sleep=slept.append)
    assert waited == slept[0] == 2 * 3600
    assert "off-peak window" in capsys.readouterr().out
    inside = dt.datetime(2026, 11, 27, 19, 0, tzinfo=dt.timezone.utc)  # 23:00 in Dubai
    assert prices.wait_for_off_peak("run", now=inside, sleep=slept.append) == 0 and len(slept) == 1
