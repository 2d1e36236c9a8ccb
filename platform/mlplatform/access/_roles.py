"""Roles, the actions each one allows, and the resources a role can be granted on.

Roles are ordered like MLflow's permissions (READ < EDIT < MANAGE): each includes the ones
below it, so a user's standing on a resource is one role, the highest of their global grant
and their grant on that resource.
"""

from __future__ import annotations

import re
from enum import Enum

from mlplatform.errors import PlatformError

GLOBAL = "*"
_RESOURCE = re.compile(r"^(registry|serve):[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_USER = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")


class AccessError(PlatformError):
    """A user, role, resource or token given to the access commands is invalid or unknown."""


class Role(str, Enum):
    viewer = "viewer"  # read: list, show, history (reads are not gated yet; see SECURITY.md)
    developer = "developer"  # register versions, export
    deployer = "deployer"  # move aliases, deploy and delete Serve apps, roll back
    admin = "admin"  # residency policy, API keys, users

    @property
    def rank(self) -> int:
        return list(Role).index(self)


# Every gated write, and the least role that may do it. Actions on "*" need a global grant.
ACTIONS: dict[str, Role] = {
    "registry.register": Role.developer,
    "registry.export": Role.developer,
    "registry.alias.set": Role.deployer,
    "registry.alias.promote": Role.deployer,
    "registry.alias.rollback": Role.deployer,
    "serve.deploy": Role.deployer,
    "serve.delete": Role.deployer,
    "serve.keys.create": Role.admin,
    "serve.keys.rotate": Role.admin,
    "serve.keys.revoke": Role.admin,
    "residency.policy.apply": Role.admin,
    "keys.rotate": Role.admin,  # the cluster's artifact encryption key (`mlplatform keys rotate`)
    "users.add": Role.admin,
    "users.grant": Role.admin,
    "users.remove": Role.admin,
}


def role(value: str | Role) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise AccessError(
            f"Got {value!r} for `--role`; must be one of {', '.join(r.value for r in Role)}."
        ) from None


def resource(value: str | None) -> str:
    """A grantable resource: '*' (everything), 'registry:<model>' or 'serve:<app>'."""
    if value in (None, "", GLOBAL):
        return GLOBAL
    if not _RESOURCE.match(value):
        raise AccessError(
            f"Got {value!r} for `--on`; must be `*` (every resource), `registry:<model name>` "
            f"(e.g. registry:digits) or `serve:<application>` (e.g. serve:digits-cpu)."
        )
    return value


def user_name(value: str) -> str:
    if not isinstance(value, str) or not _USER.match(value):
        raise AccessError(
            f"Got {value!r} for the user name; use 1-64 lowercase letters, digits and . _ @ - "
            f"(e.g. alice or alice@example.com)."
        )
    return value


def needed(action: str) -> Role:
    try:
        return ACTIONS[action]
    except KeyError:
        raise ValueError(f"Unknown action {action!r}; add it to mlplatform.access._roles.ACTIONS.") from None
