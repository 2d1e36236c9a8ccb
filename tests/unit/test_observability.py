"""The metric catalogue, the shipped dashboard and Prometheus config, and the dashboard checker.

No Ray cluster: the live check of every expression is tests/integration/test_observability_live.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO
from mlplatform.observability import DashboardError, check_dashboard, dashboard, metric_names, prometheus, record
from mlplatform.observability.check import expressions, substitute
from mlplatform.observability.metrics import COUNTER, HISTOGRAM, METRICS, exported_series

SHIPPED = REPO / "cluster_configs/observability"


def test_the_shipped_dashboard_is_the_render_and_every_expression_checks():
    text = (SHIPPED / "grafana-dashboard.json").read_text()
    assert text == dashboard.dumps(), "run `python -m mlplatform.observability render` after editing dashboard.py"
    assert check_dashboard(SHIPPED / "grafana-dashboard.json") == len(list(expressions(json.loads(text))))


def test_the_dashboard_has_a_row_per_area_and_every_platform_group_is_drawn():
    model = dashboard.render()
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert rows[:5] == ["Serving", "Training", "Tuning", "Cost", "Residency"]
    used = set().union(*(metric_names(e) for _, _, e in expressions(model)))
    drawn = {exported_series()[s].group for s in used if s in exported_series()}
    assert drawn == {m.group for m in METRICS}


def test_the_shipped_prometheus_config_is_the_render_and_scrapes_rays_discovery_file():
    text = (SHIPPED / "prometheus.yml").read_text()
    assert text == prometheus.render()
    job = yaml.safe_load(text)["scrape_configs"][0]
    assert job["file_sd_configs"][0]["files"] == ["/tmp/ray/session_latest/prom_metrics_service_discovery.json"]
    if shutil.which("promtool"):  # Debian's prometheus package ships it
        done = subprocess.run(["promtool", "check", "config", str(SHIPPED / "prometheus.yml")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_catalogue_names_follow_prometheus_conventions():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert m.name.startswith("mlplatform_") and m.help and m.tags
        # The cost gauges' `_total` names predate the catalogue (dashboards use them).
        assert (m.kind == COUNTER) == m.name.endswith("_total") or m.group == "cost", m.name
        assert bool(m.boundaries) == (m.kind == HISTOGRAM), m.name
    assert exported_series()["ray_mlplatform_train_step_seconds_bucket"].name == "mlplatform_train_step_seconds"


@pytest.mark.parametrize("expr,names", [
    ("ray_a", {"ray_a"}),
    ('sum by (app, code) (rate(ray_a{app="x", code=~"5.."}[5m]))', {"ray_a"}),
    ("histogram_quantile(0.99, sum by (le) (rate(ray_h_bucket[$__rate_interval])))", {"ray_h_bucket"}),
    ("sum(rate(ray_a[1m])) / on (app) group_left (v) sum(ray_b offset 1h) > bool 0", {"ray_a", "ray_b"}),
    ('{__name__="ray_a", job="ray"} and ray_b @ end()', {"ray_a", "ray_b"}),
    ('max_over_time(ray_a[$__range:1m]) * 1e3 + 2 unless ray_c{l="ray_not_a_metric"}', {"ray_a", "ray_c"}),
    ("sum without (rank) (ray_a) or vector(0)", {"ray_a"}),
    ("time() - ray_a:rule", {"ray_a:rule"}),
])
def test_metric_names_finds_what_an_expression_selects(expr, names):
    assert metric_names(expr) == names


def _dashboard(*exprs: str) -> dict:
    return {"panels": [{"type": "row", "title": "r", "panels": [
        {"title": "Loss", "targets": [{"refId": chr(65 + i), "expr": e} for i, e in enumerate(exprs)]}]}]}


def test_an_expression_over_a_metric_the_platform_never_exports_is_named_with_its_panel():
    with pytest.raises(DashboardError) as e:
        check_dashboard(_dashboard("avg(ray_mlplatform_train_loss)", "avg by (run) (ray_mlplatform_train_los)"))
    msg = str(e.value)
    assert "panel 'Loss' (query B) uses 'ray_mlplatform_train_los'" in msg
    assert "did you mean ray_mlplatform_train_loss?" in msg and "query A" not in msg


def test_a_platform_metric_without_rays_prefix_is_refused_with_the_exported_name():
    with pytest.raises(DashboardError, match="Ray exports it as ray_mlplatform_serve_requests_total"):
        check_dashboard(_dashboard("rate(mlplatform_serve_requests_total[1m])"))


def test_a_file_that_is_not_a_dashboard_is_refused(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DashboardError, match="not a Grafana dashboard"):
        check_dashboard(tmp_path / "list.json")
    with pytest.raises(DashboardError, match="no Prometheus expressions"):
        check_dashboard({"panels": [{"title": "text only"}]})


def test_the_command_line_checker_exits_1_and_names_the_metric(tmp_path):
    import sys

    (tmp_path / "d.json").write_text(json.dumps({"dashboard": _dashboard("ray_nope")}))
    done = subprocess.run([sys.executable, "-m", "mlplatform.observability", "check", str(tmp_path / "d.json")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "'ray_nope'" in done.stderr


def test_grafana_variables_are_substituted_and_an_unknown_one_is_named():
    assert substitute("rate(ray_a[$__rate_interval])", dashboard.VARIABLES) == "rate(ray_a[1m])"
    with pytest.raises(DashboardError, match=r"\$job"):
        substitute('ray_a{job="${job}"}', dashboard.VARIABLES)


def test_recording_never_raises(caplog):
    # No Ray worker here, an unknown metric, a missing tag: each is logged, none raises.
    record.inc("mlplatform_not_in_the_catalogue", 1, {})
    record.set_gauge("mlplatform_train_loss", float("nan"), {"run": "r"})
    record.observe("mlplatform_train_step_seconds", "not a number", {"run": "r", "rank": "0"})
    assert "mlplatform_not_in_the_catalogue" in caplog.text


@pytest.fixture
def recorded(monkeypatch):
    """What the instrumentation points record, by (metric, tags) → last value (counters: summed)."""
    seen: dict = {}

    def put(op):
        def f(name, value=1.0, tags=None):
            key = (name, tuple(sorted((tags or {}).items())))
            seen[key] = seen.get(key, 0.0) + value if op == "inc" else value
        return f

    monkeypatch.setattr(record, "inc", put("inc"))
    monkeypatch.setattr(record, "set_gauge", put("set"))
    monkeypatch.setattr(record, "observe", put("observe"))
    return seen


def test_search_metrics_count_trials_by_status_and_track_best_and_spend(recorded):
    from types import SimpleNamespace

    from mlplatform.tune import TuneSpec
    from mlplatform.tune._metrics import SearchMetrics

    spec = TuneSpec.model_validate({"name": "s", "train": "t.yaml", "metric": "val_rmse", "mode": "min",
                                    "search_space": {"optimizer.lr": {"uniform": [0.1, 0.2]}},
                                    "budget": {"amount": 1.0, "currency": "AED"}})
    cb = SearchMetrics(spec)
    cb.setup()
    a, b, c = (SimpleNamespace(trial_id=t, last_result={}) for t in "abc")
    for t in (a, b, c):
        cb.on_trial_start(0, [], t)
    cb.on_trial_result(0, [], a, {"cost": 0.2, "val_rmse": 3.0})
    cb.on_trial_result(0, [], a, {"cost": 0.3, "val_rmse": 2.0})
    cb.on_trial_result(0, [], b, {"cost": 0.1, "val_rmse": 2.5})
    a.last_result, b.last_result = {"step": 10, "total_steps": 10}, {"step": 4, "total_steps": 10}
    cb.on_trial_complete(0, [], a)
    cb.on_trial_complete(0, [], b)
    cb.on_trial_error(0, [], c)
    money = (("currency", "AED"), ("search", "s"))
    assert recorded[("mlplatform_tune_spend", money)] == pytest.approx(0.4)
    assert recorded[("mlplatform_tune_budget", money)] == 1.0
    assert recorded[("mlplatform_tune_best_metric", (("metric", "val_rmse"), ("search", "s")))] == 2.0
    assert recorded[("mlplatform_tune_trials_running", (("search", "s"),))] == 0
    ended = {dict(k[1])["status"]: v for k, v in recorded.items() if k[0] == "mlplatform_tune_trials_ended_total"}
    assert ended == {"done": 1.0, "stopped": 1.0, "error": 1.0}


def test_residency_decisions_are_counted_by_kind_and_never_by_unbounded_values(recorded):
    from mlplatform.residency import _metrics

    _metrics.count("placement", {"what": "train", "classification": "uae-restricted", "job_id": "01000000"})
    _metrics.count("denial", {"what": "train", "reason": "a long text"})
    _metrics.count("ran", {"what": "train", "classification": "uae-restricted", "placements": 7, "outside": 1})
    _metrics.count("alias", {"model": "m"})  # not a placement decision
    assert recorded == {
        ("mlplatform_residency_decisions_total", (("classification", "uae-restricted"), ("kind", "placement"),
                                                  ("what", "train"))): 1.0,
        ("mlplatform_residency_decisions_total", (("classification", ""), ("kind", "denial"), ("what", "train"))): 1.0,
        ("mlplatform_residency_placements_checked_total", (("classification", "uae-restricted"), ("outcome", "inside"),
                                                           ("what", "train"))): 6.0,
        ("mlplatform_residency_placements_checked_total", (("classification", "uae-restricted"), ("outcome", "outside"),
                                                           ("what", "train"))): 1.0,
    }


def test_every_tag_an_instrumentation_point_sends_is_a_catalogue_tag_key(recorded):
    from mlplatform.observability.metrics import BY_NAME
    from mlplatform.train._metrics import TrainMetrics

    m = TrainMetrics("run-1", 0)
    m.step(0.05, 32)
    m.window({"loss": 1.0, "lr": 0.1, "samples_per_s": 100.0, "step": 3, "progress": 0.5}, 12.0)
    from mlplatform.residency import _metrics

    _metrics.count("violation", {"what": "worker", "classification": "uae-restricted", "region": "eu-central-1"})
    for name, tags in recorded:
        assert {k for k, _ in tags} == set(BY_NAME[name].tags), name
