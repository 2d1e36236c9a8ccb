"""The one check every write runs first: who is calling, may they, and the audit record of it.

Every decision, allowed or refused, is appended to the hash-chained audit trail
(residency/audit.py): the cluster's trail when the process works for a cluster
(MLPLATFORM_CLUSTER set, as in jobs and after `connect`), else this machine's access trail at
$MLPLATFORM_HOME/access/audit.jsonl, so a refusal off any cluster is on record too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlplatform._internal import storage
from mlplatform.access import _store
from mlplatform.access._identity import TOKEN_ENV, AuthenticationError, Caller, current
from mlplatform.access._roles import GLOBAL, Role, needed
from mlplatform.errors import PlatformError

AUDIT_KIND = "access"


class AccessDenied(PlatformError):
    """The caller's role does not allow the action on the resource; the message says what would."""


def require(action: str, on: str = GLOBAL, *, target: str | None = None) -> Caller:
    """Check that the caller may do `action` on resource `on`, record the decision, return the caller.

    Args:
        action: a key of ACTIONS, e.g. 'registry.alias.set'.
        on: 'registry:<model>', 'serve:<app>' or '*' (actions on '*' need a global grant).
        target: what the action changes when `on` does not say it (the user added), for the record.

    Raises:
        AccessDenied: the caller's role on `on` is below the one `action` needs.
        AuthenticationError: no usable token (see _identity.py).
    """
    need = needed(action)
    try:
        caller = identify()
    except AuthenticationError as e:
        _record(action=action, resource=on, target=target, user=None, role=None, needed=need.value,
                allowed=False, reason=f"authentication: {e}")
        raise
    held = caller.user.role_on(on)
    allowed = held is not None and held.rank >= need.rank
    _record(action=action, resource=on, target=target, user=caller.user.name, role=held.value if held else None,
            needed=need.value, allowed=allowed, via=caller.via)
    if not allowed:
        raise AccessDenied(_refusal(caller, held, action, on, need))
    return caller


def identify() -> Caller:
    """The caller of this process; creating the operator's token (bootstrap) is itself recorded."""
    caller = current(_store.engine())
    if caller.bootstrapped:
        _record(action="users.bootstrap", resource=GLOBAL, user=caller.user.name, role=Role.admin.value,
                needed=Role.admin.value, allowed=True, via=caller.via)
    return caller


def local_trail() -> Path:
    """This machine's access trail (decisions made by processes not working for a cluster)."""
    return storage.home() / "access" / "audit.jsonl"


def _record(**fields: Any) -> None:
    from mlplatform.residency import audit
    from mlplatform.residency.names import CLUSTER_ENV

    if os.environ.get(CLUSTER_ENV):
        from mlplatform import residency

        residency.record(AUDIT_KIND, **fields)
    else:
        audit.append(local_trail(), AUDIT_KIND, **fields)


def _refusal(caller: Caller, held: Role | None, action: str, on: str, need: Role) -> str:
    name = caller.user.name
    standing = f"role {held.value} on {on}" if held else f"no role on {on}"
    scope = "" if on == GLOBAL else f" --on {on}"
    where = "globally (`--on *`)" if on == GLOBAL else f"on {on}"
    return (
        f"User {name!r} ({standing}, identified by {caller.via}) may not {action} {where}: that needs role "
        f"{need.value} or higher. Ask an admin to run `mlplatform users grant {name} --role {need.value}{scope}`, "
        f"or present a token of a user who holds it ({TOKEN_ENV})."
    )
