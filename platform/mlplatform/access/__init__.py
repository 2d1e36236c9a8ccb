"""Users and roles: who may change the registry, Serve applications, keys, policy and users.

    mlplatform users add alice --role deployer --on registry:digits   # prints alice's token once
    MLPLATFORM_TOKEN=mlpu.... mlplatform registry alias digits production 3

    from mlplatform import access
    access.require("registry.alias.set", "registry:digits")   # first line of every write

Roles are ordered (viewer < developer < deployer < admin, each including the ones below) and
granted globally (`*`) or on one resource (`registry:<model>`, `serve:<app>`); ACTIONS lists
what each write needs. Users and hashed tokens live in the metadata store; every decision is
recorded in the audit trail. The trust boundary (what this does not stop) is in SECURITY.md.
"""

from __future__ import annotations

from mlplatform.access._check import AccessDenied, local_trail, require
from mlplatform.access._identity import (
    BOOTSTRAP_ENV,
    OPERATOR,
    TOKEN_ENV,
    TOKEN_FILE_ENV,
    AuthenticationError,
    Caller,
)
from mlplatform.access._roles import ACTIONS, GLOBAL, AccessError, Role
from mlplatform.access._store import User

__all__ = [
    "ACTIONS",
    "BOOTSTRAP_ENV",
    "GLOBAL",
    "OPERATOR",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "AccessDenied",
    "AccessError",
    "AuthenticationError",
    "Caller",
    "Role",
    "User",
    "add_user",
    "grant",
    "list_users",
    "local_trail",
    "remove_user",
    "require",
    "whoami",
]


def add_user(name: str, role: Role | str, on: str | None = None) -> tuple[User, str]:
    """Create user `name` with `role` on `on` (default global); returns (user, token shown once). Admin only."""
    from mlplatform.access import _store

    caller = require("users.add", target=name)
    return _store.add_user(_store.engine(), name, role, on, by=caller.user.name)


def grant(name: str, role: Role | str, on: str | None = None) -> User:
    """Set `name`'s role on `on` (default global), replacing the role held there. Admin only."""
    from mlplatform.access import _store

    require("users.grant", target=name)
    return _store.grant(_store.engine(), name, role, on)


def remove_user(name: str) -> None:
    """Delete user `name` and every token they hold. Admin only."""
    from mlplatform.access import _store

    require("users.remove", target=name)
    _store.remove_user(_store.engine(), name)


def list_users() -> list[User]:
    """Every user with their grants and how many tokens they hold (never the tokens)."""
    from mlplatform.access import _store

    return _store.list_users(_store.engine())


def whoami() -> Caller:
    """The identity this process acts as (bootstrapping the operator if no token is presented)."""
    from mlplatform.access import _check

    return _check.identify()
