"""Check a Grafana dashboard's PromQL against the metrics the platform exports.

A dashboard expression over a metric nobody exports is not an error to Prometheus or
Grafana: the panel is just empty, forever. `check_dashboard` finds every metric name each
expression selects and refuses any that is neither in the platform's catalogue (as
exported by Ray: `ray_<name>`, histograms as `_bucket`, `_count`, `_sum`) nor one of the
Ray system metrics listed here.

Names are found by a small lexer, not a full PromQL parser: strings, label matchers `{..}`,
range and subquery brackets `[..]`, grouping clauses (`by (..)`, `on (..)` ...) and offset
and `@` modifiers are blanked; what is left that looks like an identifier and is not a
function call, a keyword or part of a number is a metric name. `{__name__="x"}` selects x.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlplatform.errors import PlatformError
from mlplatform.observability.metrics import BY_NAME, PREFIX, exported_series

# Ray's own metrics (its reporter agent, per node) that the dashboard may use.
RAY_SYSTEM_METRICS = frozenset({"ray_node_cpu_utilization", "ray_node_mem_used"})

_KEYWORDS = frozenset({"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
                       "group_right", "offset", "atan2", "inf", "nan"})
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*(=~|!=|!~|=)\s*("(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\')')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MODIFIER = re.compile(r"\boffset\s+-?[0-9a-zA-Z$_{}]+|@\s*(start\(\)|end\(\)|[0-9.]+)")
_IDENT = re.compile(r"(?<![\w.:$])[a-zA-Z_:][a-zA-Z0-9_:]*")
_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")


class DashboardError(PlatformError):
    """A dashboard expression uses a metric the platform never exports, or the file is not a dashboard."""


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana `$variables` allowed)."""
    names: set[str] = set()
    for op, quoted in _NAME_MATCHER.findall(expr):
        if op == "=":
            names.add(quoted[1:-1])
    text = _STRING.sub('""', expr)
    text = _blank(text, "{", "}")
    text = _blank(text, "[", "]")
    text = _GROUPING.sub(" ", text)
    text = _MODIFIER.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    for m in _IDENT.finditer(text):
        word = m.group(0)
        if word.lower() in _KEYWORDS or re.match(r"\s*\(", text[m.end():]):
            continue  # a keyword, or a function / aggregation call
        names.add(word)
    return names


def _blank(text: str, open_: str, close: str) -> str:
    """`text` with every `open_ ... close` span (outermost, nesting allowed) replaced by a space."""
    out, depth = [], 0
    for ch in text:
        if ch == open_:
            depth += 1
        elif ch == close and depth:
            depth -= 1
            if not depth:
                out.append(" ")
            continue
        if not depth:
            out.append(ch)
    return "".join(out)


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expression) of every Prometheus query in the dashboard, rows' panels included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for panel in panels:
            for target in panel.get("targets") or []:
                if target.get("expr"):
                    yield panel.get("title") or f"panel {panel.get('id')}", target.get("refId", "?"), target["expr"]
            yield from walk(panel.get("panels") or [])

    yield from walk(dashboard.get("panels") or [])


def check_dashboard(dashboard: dict[str, Any] | str | Path) -> int:
    """Check every expression of a dashboard (its JSON model, or a file); how many were checked.

    Raises:
        DashboardError: naming the panel, the expression and each unknown metric, with the closest
            exported name where there is one.
    """
    if not isinstance(dashboard, dict):
        dashboard = _load(Path(dashboard))
    known = set(exported_series()) | RAY_SYSTEM_METRICS
    problems, checked = [], 0
    for title, ref, expr in expressions(dashboard):
        checked += 1
        for name in sorted(metric_names(expr) - known):
            problems.append(f"panel {title!r} (query {ref}) uses {name!r}, a metric the platform never exports"
                            f"{_hint(name, known)}; expression: {expr}")
    if problems:
        raise DashboardError(
            "\n".join(problems) + "\nExported: ray_<name> for each metric in mlplatform.observability.metrics.METRICS "
            "(histograms as _bucket, _count, _sum) and Ray's system metrics "
            f"{', '.join(sorted(RAY_SYSTEM_METRICS))}. Fix the expression, or add the metric to the catalogue "
            "and record it."
        )
    if checked == 0:
        raise DashboardError("the dashboard has no Prometheus expressions (no panel target with `expr`)")
    return checked


def _hint(name: str, known: set[str]) -> str:
    if name in BY_NAME:
        return f" under that name (Ray exports it as {PREFIX}{name})"
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def substitute(expr: str, variables: dict[str, str]) -> str:
    """`expr` with Grafana's `$name` / `${name}` variables replaced by `variables` (for running it
    outside Grafana).

    Raises:
        DashboardError: a variable without a value in `variables`.
    """
    def one(m: re.Match) -> str:
        if m.group(1) not in variables:
            raise DashboardError(f"expression {expr!r} uses Grafana variable ${m.group(1)}, which has no value here; "
                                 f"known: {', '.join(sorted(variables))}")
        return variables[m.group(1)]

    return _VARIABLE.sub(one, expr)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DashboardError(f"cannot read dashboard {path}: {e}; pass a Grafana dashboard JSON file") from None
    if not isinstance(data, dict):
        raise DashboardError(f"{path} holds a JSON {type(data).__name__}, not a Grafana dashboard (an object "
                             "with `panels`)")
    return data.get("dashboard", data)  # the API's export wraps the model in {"dashboard": ...}
