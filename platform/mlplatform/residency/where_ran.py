"""Where a job's work landed, for people: a table per node and what ran there, and a plot.

Reads what `sweep` returns (Ray's state API, checked against the job's classification) and the
cluster's node inventory; computes nothing the sweep does not already know.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from mlplatform.residency.sweep import Finding, Placement


def _nodes(nodes: Sequence[Any]) -> dict[str, Any]:
    return {n.node_id: n for n in nodes}


def placements_table(checked: Sequence[Placement], findings: Sequence[Finding], nodes: Sequence[Any]) -> str:
    """A text table: per node (name, group, region) and actor/task name, how many ran there and
    whether that is inside the job's allowed regions. `nodes`: `mlplatform.cluster.inventory()`."""
    from mlplatform.cli import table

    by_id = _nodes(nodes)
    outside = {f.placement.id for f in findings}
    counts: Counter[tuple[str, str, str, str, str, str]] = Counter()
    for p in checked:
        n = by_id.get(p.node_id)
        counts[(n.name if n else p.node_id[:12], n.group if n else "?", p.region or "?", p.kind, p.name,
                "OUTSIDE" if p.id in outside else "inside")] += 1
    rows = [[*key[:5], count, key[5]] for key, count in sorted(counts.items())]
    return table(["NODE", "GROUP", "REGION", "KIND", "NAME", "COUNT", "POLICY"], rows)


def placements_figure(checked: Sequence[Placement], findings: Sequence[Finding], nodes: Sequence[Any],
                      title: str = "where the job's actors and tasks ran"):
    """A matplotlib Figure: actors and tasks per node (stacked), nodes labelled with group and region,
    bars inside the allowed regions green and any outside red."""
    from matplotlib.figure import Figure

    by_id = _nodes(nodes)
    outside = {f.placement.id for f in findings}
    order = [n.node_id for n in nodes] + sorted({p.node_id for p in checked} - set(by_id))
    labels = [f"{by_id[i].name}\n{by_id[i].group} / {by_id[i].region}" if i in by_id else i[:12] for i in order]
    fig = Figure(figsize=(8, 0.6 * len(order) + 1.5), dpi=100)
    ax = fig.add_subplot()
    left = [0] * len(order)
    for kind, inside, colour in (("actor", True, "tab:green"), ("task", True, "palegreen"),
                                 ("actor", False, "tab:red"), ("task", False, "lightcoral")):
        counts = [sum(1 for p in checked if p.node_id == i and p.kind == kind and (p.id not in outside) == inside)
                  for i in order]
        if any(counts):
            ax.barh(labels, counts, left=left, color=colour,
                    label=f"{kind}s {'inside' if inside else 'OUTSIDE'} allowed regions")
            left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set_xlabel("actors and tasks")
    ax.set_title(f"{title} ({len(checked)}; {len(findings)} outside)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return fig
