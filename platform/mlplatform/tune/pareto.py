"""The metric/cost trade-off of a finished search: front, table, plot, winner.

A row is one trial as a dict: "trial" (id), "config" (dotted path → value), the metric,
"cost" (its spend), and optionally "market", "region", "status" (Tune's, e.g. TERMINATED,
ERROR). Rows whose metric or cost is missing or not a finite number are on no front and
win nothing; they still appear in the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mlplatform.tune.spec import COST_KEY, TuneSpec


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _valid(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [r for r in rows if _number(r.get(metric)) is not None and _number(r.get(COST_KEY)) is not None]


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _dominates(a: dict[str, Any], b: dict[str, Any], metric: str, mode: str) -> bool:
    """a is no worse than b in cost and metric, and strictly better in one."""
    am, bm, ac, bc = float(a[metric]), float(b[metric]), float(a[COST_KEY]), float(b[COST_KEY])
    no_worse = ac <= bc and (am == bm or _better(am, bm, mode))
    return no_worse and (ac < bc or _better(am, bm, mode))


def front(rows: list[dict[str, Any]], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """The non-dominated rows (lower cost, better metric), cheapest first.

    Rows with identical cost and metric are all kept (none dominates the other).
    """
    valid = _valid(rows, metric)
    out = [r for r in valid if not any(_dominates(o, r, metric, mode) for o in valid if o is not r)]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(out, key=lambda r: (float(r[COST_KEY]), sign * float(r[metric])))


@dataclass(frozen=True)
class Best:
    """The winning trial (None when no trial has the metric), whether it met the target, and why it won."""

    row: dict[str, Any] | None
    target_reached: bool | None
    why: str


def best(rows: list[dict[str, Any]], spec: TuneSpec) -> Best:
    """The winner by `spec.objective.kind`; trials with status ERROR never win.

    max_metric: best metric (cheaper on ties). max_metric_within_budget: best metric among
    trials costing at most budget.amount. min_cost_to_target: cheapest trial reaching the
    target, else the best metric with target_reached False. pareto: best metric on the front.
    """
    metric, mode, kind = spec.metric, spec.mode, spec.objective.kind
    pool = [r for r in _valid(rows, metric) if str(r.get("status", "")).upper() != "ERROR"]

    def top(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
        sign = -1.0 if mode == "max" else 1.0
        return min(candidates, key=lambda r: (sign * float(r[metric]), float(r[COST_KEY])), default=None)

    if kind == "max_metric":
        row = top(pool)
        return Best(row, None, f"best {metric}" if row else f"no trial reported {metric}")
    if kind == "max_metric_within_budget":
        amount = spec.budget.amount if spec.budget.amount is not None else math.inf
        row = top([r for r in pool if float(r[COST_KEY]) <= amount])
        limit = f"cost <= {amount:g} {spec.budget.currency}"
        return Best(row, None, f"best {metric} among trials with {limit}" if row else f"no trial with {metric} and {limit}")
    if kind == "min_cost_to_target":
        target = spec.objective.target
        reached = [r for r in pool if target is not None
                   and (float(r[metric]) >= target if mode == "max" else float(r[metric]) <= target)]
        if reached:
            row = min(reached, key=lambda r: (float(r[COST_KEY]), -float(r[metric]) if mode == "max" else float(r[metric])))
            return Best(row, True, f"cheapest trial reaching {metric} {target:g}")
        row = top(pool)
        return Best(row, False, f"no trial reached {metric} {target:g}; best {metric} instead" if row
                    else f"no trial reported {metric}")
    row = top(front(pool, metric, mode))
    return Best(row, None, f"best {metric} on the {metric}/cost front" if row else f"no trial reported {metric}")


def _short_keys(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Dotted path → its last part, unless two paths share it."""
    paths = sorted({k for r in rows for k in (r.get("config") or {})})
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (s if last.count(s) == 1 else p) for p, s in zip(paths, last)}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return str(list(value)).replace(" ", "")
    return str(value)


def table(rows: list[dict[str, Any]], metric: str, mode: str = "max", currency: str = "USD") -> str:
    """A markdown table of every trial, cheapest first, with ✓ on the front."""
    on_front = {id(r) for r in front(rows, metric, mode)}
    short = _short_keys(rows)
    lines = [
        f"| trial | config | {metric} | cost ({currency}) | market | region | status | on front |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def order(r: dict[str, Any]) -> tuple[float, str]:
        cost = _number(r.get(COST_KEY))
        return (cost if cost is not None else math.inf, str(r.get("trial", "")))

    for r in sorted(rows, key=order):
        config = ", ".join(f"{short[k]}={_fmt(v)}" for k, v in sorted((r.get("config") or {}).items()))
        m, c = _number(r.get(metric)), _number(r.get(COST_KEY))
        lines.append("| " + " | ".join([
            str(r.get("trial", "")), config or "-", f"{m:.4f}" if m is not None else "-",
            f"{c:.6f}" if c is not None else "-", str(r.get("market") or "-"), str(r.get("region") or "-"),
            str(r.get("status") or "-"), "✓" if id(r) in on_front else "",
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, metric: str, mode: str = "max", title: str = "",
         currency: str = "USD", winner: dict[str, Any] | None = None) -> str:
    """A PNG of metric against cost: every trial a point, the front a line of highlighted points.

    Headless (matplotlib's Agg canvas, no display, no pyplot state). Returns `path`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    valid = _valid(rows, metric)
    edge = front(rows, metric, mode)
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter([float(r[COST_KEY]) for r in valid], [float(r[metric]) for r in valid],
               s=28, color="0.6", label=f"trials ({len(valid)})", zorder=2)
    if edge:
        # A step line: between two front points, the cheaper one's metric is what that money buys.
        ax.plot([float(r[COST_KEY]) for r in edge], [float(r[metric]) for r in edge],
                drawstyle="steps-post", color="tab:blue", linewidth=1.5, zorder=3)
        ax.scatter([float(r[COST_KEY]) for r in edge], [float(r[metric]) for r in edge],
                   s=60, color="tab:blue", edgecolor="black", label=f"front ({len(edge)})", zorder=4)
    if winner is not None and _number(winner.get(metric)) is not None and _number(winner.get(COST_KEY)) is not None:
        ax.scatter([float(winner[COST_KEY])], [float(winner[metric])], s=180, marker="*", color="tab:orange",
                   edgecolor="black", label=f"winner {winner.get('trial', '')}", zorder=5)
    ax.set_xlabel(f"cost ({currency})")
    ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
    ax.set_title(title or f"{metric} vs cost")
    ax.grid(True, alpha=0.3)
    if valid:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
