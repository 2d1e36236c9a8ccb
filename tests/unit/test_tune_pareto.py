"""The metric/cost front, its table and plot, and the winner by objective."""

from conftest import REPO
from mlplatform import config
from mlplatform.tune.pareto import best, front, plot, table
from mlplatform.tune.spec import TuneSpec

SHIPPED = config.load(REPO / "jobs" / "configs" / "tune-digits.yaml", TuneSpec)


def row(trial, cost, acc, status="TERMINATED", **config_):
    return {"trial": trial, "cost": cost, "val_accuracy": acc, "status": status, "market": "spot",
            "region": "me-central-1", "config": config_ or {"optimizer.lr": 0.01, "model.kwargs.hidden": [32]}}


ROWS = [
    row("E", 0.5, 0.80),
    row("A", 1.0, 0.90),
    row("G", 1.0, 0.90),   # ties A exactly: neither dominates, both on the front
    row("C", 2.0, 0.93),   # B is as cheap and better
    row("B", 2.0, 0.95),
    row("D", 3.0, 0.95),   # B is as good and cheaper
    row("F", 4.0, 0.97),
    row("H", 0.1, None),   # no metric: on no front
    row("I", None, 0.99),  # no cost: on no front
    row("J", 0.2, float("nan")),
]


def names(rows):
    return [r["trial"] for r in rows]


def variant(**changes) -> TuneSpec:
    data = SHIPPED.model_dump(by_alias=True)
    for key, value in changes.items():
        data[key] = {**data[key], **value}
    return TuneSpec.model_validate(data)


def test_front_of_a_known_point_set():
    assert names(front(ROWS, "val_accuracy", "max")) == ["E", "A", "G", "B", "F"]


def test_front_when_lower_is_better():
    rows = [{"trial": t, "cost": c, "loss": l} for t, c, l in
            [("a", 1, 0.5), ("b", 2, 0.3), ("c", 2, 0.4), ("d", 3, 0.3), ("e", 0.5, 0.9)]]
    assert names(front(rows, "loss", "min")) == ["e", "a", "b"]
    assert front([], "loss", "min") == [] and front([{"cost": 1}], "loss", "min") == []


def test_table_marks_the_front_and_shows_missing_values():
    text = table(ROWS, "val_accuracy", "max")
    lines = text.splitlines()
    assert lines[0] == "| trial | config | val_accuracy | cost (USD) | market | region | status | on front |"
    by_trial = {line.split(" | ")[0].lstrip("| "): line for line in lines[2:]}
    assert set(by_trial) == set(names(ROWS))
    assert all(by_trial[t].endswith("| ✓ |") for t in "EAGBF")
    assert not any(by_trial[t].endswith("| ✓ |") for t in "CDHIJ")
    assert "| hidden=[32], lr=0.01 |" in by_trial["A"]
    assert "| - | 0.100000 |" in by_trial["H"] and by_trial["I"].count("| - |") == 1
    # Cheapest first, trials without a cost last.
    assert lines[2].startswith("| H |") and lines[3].startswith("| J |") and lines[-1].startswith("| I |")


def test_plot_writes_a_png(tmp_path):
    out = plot(ROWS, str(tmp_path / "front.png"), "val_accuracy", "max", "digits", winner=ROWS[4])
    data = (tmp_path / "front.png").read_bytes()
    assert out.endswith("front.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    plot([], str(tmp_path / "empty.png"), "val_accuracy", "max", "nothing yet")
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_best_min_cost_to_target():
    win = best(ROWS, SHIPPED)  # target 0.95: B and D reach it, F too; B is cheapest
    assert win.row["trial"] == "B" and win.target_reached is True
    missed = best([r for r in ROWS if r["trial"] in "EAC"], SHIPPED)
    assert missed.row["trial"] == "C" and missed.target_reached is False and "no trial reached" in missed.why


def test_best_by_other_objectives():
    assert best(ROWS, variant(objective={"kind": "max_metric", "target": None})).row["trial"] == "F"
    within = variant(objective={"kind": "max_metric_within_budget", "target": None}, budget={"amount": 2.5})
    assert best(ROWS, within).row["trial"] == "B"
    assert best(ROWS, variant(objective={"kind": "max_metric_within_budget", "target": None},
                              budget={"amount": 0.3})).row is None
    pareto = variant(objective={"kind": "pareto", "target": None}, searcher={"name": "optuna_multi"})
    assert best(ROWS, pareto).row["trial"] == "F"


def test_failed_trials_never_win_and_ties_go_to_the_cheaper():
    rows = [row("x", 1.0, 0.99, status="ERROR"), row("y", 2.0, 0.97), row("z", 1.5, 0.97)]
    win = best(rows, variant(objective={"kind": "max_metric", "target": None}))
    assert win.row["trial"] == "z"
    assert best([row("x", 1.0, None)], SHIPPED).row is None
