"""Aliases (production, canary, ...): set, promote, roll back, and the history of every move.

Rollback walks back through the alias's own history like an undo stack: each set or
promote to a new version pushes it, each rollback pops one, so repeated rollbacks go
back one deployment at a time and the history stays append-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from mlplatform import access, residency
from mlplatform.errors import AliasNotFound, InvalidName

from mlplatform.registry import _lineage
from mlplatform.registry._index import Index, read_index, select, update_index
from mlplatform.registry._names import check_alias, check_name, parse_selector
from mlplatform.registry._records import AliasMove, move_from_json, move_to_json
from mlplatform.registry._store import Store

Root = str | os.PathLike[str] | None


def set_alias(
    name: str,
    alias: str,
    version: int | str,
    *,
    root: Root = None,
    actor: str | None = None,
    reason: str | None = None,
) -> AliasMove:
    """Point `alias` of model `name` at `version` (a number, another alias or 'latest')."""
    check_name(name)
    check_alias(alias)
    access.require("registry.alias.set", f"registry:{name}")
    selector = parse_selector(version)

    def change(index: Index) -> AliasMove:
        return _move(index, alias, select(index, selector), "set", actor, reason)

    return _audited(Store(root), name, change)


def promote(
    name: str,
    from_alias: str = "canary",
    to_alias: str = "production",
    *,
    root: Root = None,
    actor: str | None = None,
    reason: str | None = None,
) -> AliasMove:
    """Point `to_alias` at the version `from_alias` points at (canary -> production by default)."""
    check_name(name)
    check_alias(from_alias, "from_alias")
    check_alias(to_alias, "to_alias")
    access.require("registry.alias.promote", f"registry:{name}")
    if from_alias == to_alias:
        raise InvalidName(
            f"Got {from_alias!r} for both `from_alias` and `to_alias`; promote copies one "
            f"alias's target to another, e.g. promote({name!r}, 'canary', 'production')."
        )

    def change(index: Index) -> AliasMove:
        target = select(index, from_alias, "from_alias")
        return _move(index, to_alias, target, "promote", actor, reason, source_alias=from_alias)

    return _audited(Store(root), name, change)


def rollback(
    name: str,
    alias: str,
    *,
    root: Root = None,
    actor: str | None = None,
    reason: str | None = None,
) -> AliasMove:
    """Move `alias` back to the version it pointed at before its latest set or promote."""
    check_name(name)
    check_alias(alias)
    access.require("registry.alias.rollback", f"registry:{name}")

    def change(index: Index) -> AliasMove:
        select(index, alias, "alias")  # a clear AliasNotFound if it was never set
        stack = _targets(index, alias)
        if len(stack) < 2:
            raise AliasNotFound(
                f"Alias {alias!r} of model {name!r} has no earlier target to roll back to "
                f"(it points at version {stack[-1]} and was never moved from another version). "
                f"Use set_alias({name!r}, {alias!r}, version) to point it elsewhere."
            )
        return _move(index, alias, stack[-2], "rollback", actor, reason)

    return _audited(Store(root), name, change)


def alias_history(name: str, alias: str | None = None, *, root: Root = None) -> list[AliasMove]:
    """Every alias move of model `name`, oldest first; only those of `alias` if given."""
    check_name(name)
    if alias is not None:
        check_alias(alias)
    moves = [move_from_json(m) for m in read_index(Store(root), name)["alias_history"]]
    return [m for m in moves if alias is None or m.alias == alias]


def list_aliases(name: str, *, root: Root = None) -> dict[str, int]:
    """{alias: version} for model `name`."""
    check_name(name)
    return dict(sorted(read_index(Store(root), name)["aliases"].items()))


def _audited(store: Store, name: str, change: Callable[[Index], AliasMove]) -> AliasMove:
    """Apply an alias move, then record it in the cluster's residency audit trail (which model
    version serves under which alias is part of where restricted data goes)."""
    move = update_index(store, name, change)
    residency.record(
        "alias", registry=store.display, model=name, alias=move.alias, action=move.action,
        from_version=move.from_version, to_version=move.to_version, actor=move.actor, reason=move.reason,
        source_alias=move.source_alias,
    )
    return move


def _move(
    index: Index,
    alias: str,
    target: int,
    action: str,
    actor: str | None,
    reason: str | None,
    source_alias: str | None = None,
) -> AliasMove:
    move = AliasMove(
        alias=alias,
        from_version=index["aliases"].get(alias),
        to_version=target,
        actor=_lineage.current_user(actor),
        at=_lineage.now(),
        action=action,
        reason=reason,
        source_alias=source_alias,
    )
    index["aliases"][alias] = target
    # Recorded even when the target is unchanged: the history is an audit trail.
    index["alias_history"].append(move_to_json(move))
    return move


def _targets(index: Index, alias: str) -> list[int]:
    """The alias's undo stack, replayed from its history."""
    stack: list[int] = []
    for move in index["alias_history"]:
        if move["alias"] != alias:
            continue
        if move["action"] == "rollback":
            if stack:
                stack.pop()
        elif not stack or stack[-1] != move["to_version"]:
            stack.append(move["to_version"])
    return stack
