"""Spec base class and YAML loading with one error that lists every problem.

Every file a user writes is a `Spec` subclass: unknown keys are rejected and every
field carries a description (a unit test enforces it). `load(path, Model)` reads a
YAML file and either returns the validated model or raises one `SpecError` that
names the file and, for each problem, the field path, its line, the value given
and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mlplatform.errors import SpecError

M = TypeVar("M", bound=BaseModel)


class Spec(BaseModel):
    """Base of every user-written spec: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


def load(path: str | Path, model: type[M]) -> M:
    """Read a YAML file and validate it against `model`.

    Raises:
        SpecError: the file is missing, is not YAML, or does not fit the model;
            the message lists every problem at once.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file. Check the path, e.g. `ls {path.parent}`.") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot be read ({e.strerror}).") from None
    return parse(text, model, source=str(path))


def parse(text: str, model: type[M], source: str = "<spec>") -> M:
    """Validate YAML text against `model`; `source` names it in errors."""
    data, root = read_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: must be a YAML mapping of fields to values for {model.__name__}; "
            f"got a {type(data).__name__}."
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source, root)) from None


def read_yaml(text: str, source: str = "<spec>") -> tuple[Any, yaml.Node | None]:
    """The values of spec YAML `text` and its node tree, hostile files refused first (size, alias
    bombs, recursive anchors, deep nesting): every reader of a user's spec goes through here.

    Raises:
        SpecError: not YAML, or one of those; the message says what and how to fix it.
    """
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(
            f"{source}: {len(text):,} characters; a spec may have at most {MAX_SPEC_CHARS:,}. Specs name "
            f"their data by path; put large values (datasets, weights) in files and reference them."
        )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_expansion(root, source)  # before building values: an alias bomb is a small graph, huge tree
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError(f"{source}:{where}: not valid YAML: {problem}.") from None
    except RecursionError:  # PyYAML composes recursively: thousands of nested [ or { exhaust the stack
        raise SpecError(
            f"{source}: values are nested too deeply to read; a spec nests a few levels. Flatten the "
            f"nested lists or mappings."
        ) from None
    return data, root


# A spec is a few hundred values; these bounds stop hostile files long before memory or CPU runs out.
MAX_SPEC_CHARS = 1_000_000
MAX_SPEC_VALUES = 100_000


def _check_expansion(root: yaml.Node | None, source: str) -> None:
    """Refuse YAML whose anchors and aliases expand to more than MAX_SPEC_VALUES values ("billion laughs").

    PyYAML shares an aliased node rather than copying it, so the file loads small, but validation and
    error formatting walk the expanded tree: 9 levels of 9 aliases is 9**9 values. Sizes are counted
    per node once (memoized), so the check itself is linear in the file.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            mark = node.start_mark
            raise SpecError(
                f"{source}: line {mark.line + 1}: a YAML alias refers to a node that contains it (a recursive "
                f"anchor); specs must be trees. Write the value out instead of using the anchor."
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        sizes[key] = total
        if total > MAX_SPEC_VALUES:
            mark = node.start_mark
            raise SpecError(
                f"{source}: line {mark.line + 1}: YAML anchors and aliases (&name / *name) expand to more than "
                f"{MAX_SPEC_VALUES:,} values (an alias bomb?); a spec is far smaller. Write the values out or "
                f"remove the nested aliases."
            )
        return total

    if root is not None:
        size(root)


def validate(data: dict[str, Any], model: type[M], source: str) -> M:
    """Validate an in-memory mapping (flags, API payloads) with the same error format."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, source)) from None


def format_validation_error(
    error: ValidationError, source: str, root: yaml.Node | None = None
) -> str:
    """One message, one line per problem: where, the value given, what is allowed."""
    problems = error.errors(include_url=False)
    noun = "problem" if len(problems) == 1 else "problems"
    lines = [f"{source}: {len(problems)} {noun} in {error.title}:"]
    for problem in problems:
        loc = _dotted(problem["loc"])
        line = _line_of(root, problem["loc"]) if root is not None else None
        where = f"{loc} (line {line})" if line else loc
        lines.append(f"  - {where}: {_explain(problem)}")
    return "\n".join(lines)


def _explain(problem: dict[str, Any]) -> str:
    kind = problem["type"]
    given = problem.get("input")
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling against the documented fields."
    if kind == "missing":
        return "required field is missing; add it."
    msg = problem["msg"]
    # pydantic's "Value error, ..." prefix adds nothing for a reader.
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"got {given!r}; {msg[0].lower()}{msg[1:]}" if msg else f"got {given!r}."


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the deepest YAML node on `loc` that exists in the file."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((kv for kv in node.value if kv[0].value == part), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
