"""Users, grants and hashed tokens in the metadata store.

A token reads `mlpu.<token_id>.<secret>`. The secret is 256 random bits, so a salted sha256
is enough to make the stored hash useless to a reader of the database (the argument of
serve/_keys.py); the token id finds the row without scanning every hash.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from mlplatform._internal import metadata, storage
from mlplatform.access._roles import GLOBAL, AccessError, Role, resource, role, user_name

DB_FILE = "metadata.db"  # the platform-wide store, shared with the cost ledger
PREFIX = "mlpu"
_TOKEN = re.compile(r"^mlpu\.([0-9a-f]{16})\.([A-Za-z0-9_-]{20,})$")


@dataclass(frozen=True)
class User:
    """A user and their grants ({resource: role}; '*' is global). Never carries a token."""

    name: str
    grants: dict[str, Role]
    created_at: str
    created_by: str
    tokens: int = 0

    def role_on(self, res: str) -> Role | None:
        """The highest of the user's global role and their role on `res`."""
        held = [r for key, r in self.grants.items() if key in (GLOBAL, res)]
        return max(held, key=lambda r: r.rank) if held else None


def engine(url: str | None = None) -> Any:
    """The platform's metadata store: MLPLATFORM_METADATA_URL, else $MLPLATFORM_HOME/metadata.db."""
    return metadata.open_store(url or metadata.configured_url() or metadata.sqlite_url(storage.home() / DB_FILE))


def add_user(eng: Any, name: str, grant: Role | str, on: str | None, by: str) -> tuple[User, str]:
    """Create a user with one grant and a first token; (user, plaintext token)."""
    from mlplatform._internal.metadata.tables import access_grants, access_users

    import sqlalchemy as sa

    name, grant, on = user_name(name), role(grant), resource(on)
    exists = AccessError(
        f"User {name!r} already exists; change their role with `mlplatform users grant {name} --role ROLE`, "
        f"or `mlplatform users remove {name}` first to issue a new token."
    )
    try:
        with metadata.write_transaction(eng) as conn:
            if _exists(conn, name):
                raise exists
            conn.execute(access_users.insert().values(name=name, created_at=_now(), created_by=by))
            conn.execute(access_grants.insert().values(name=name, resource=on, role=grant.value))
            token = _issue(conn, name)
    except sa.exc.IntegrityError:  # added by another admin at the same moment
        raise exists from None
    return get_user(eng, name), token


def ensure_user(eng: Any, name: str, grant: Role, by: str) -> str:
    """A new token for `name`, creating the user with a global `grant` if missing (bootstrap)."""
    import sqlalchemy as sa

    from mlplatform._internal.metadata.tables import access_grants, access_users

    for attempt in (1, 2):
        try:
            with metadata.write_transaction(eng) as conn:
                if not _exists(conn, name):
                    conn.execute(access_users.insert().values(name=name, created_at=_now(), created_by=by))
                    conn.execute(access_grants.insert().values(name=name, resource=GLOBAL, role=grant.value))
                return _issue(conn, name)
        except sa.exc.IntegrityError:
            # Another home bootstrapped the same user at the same moment (PostgreSQL does not
            # serialise inserts of a row that did not exist): it exists now, so the retry only adds a token.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def grant(eng: Any, name: str, grant: Role | str, on: str | None) -> User:
    """Set `name`'s role on `on` (replacing the one held there)."""
    import sqlalchemy as sa

    from mlplatform._internal.metadata.tables import access_grants

    name, grant, on = user_name(name), role(grant), resource(on)
    with metadata.write_transaction(eng) as conn:
        _known(conn, name)
        conn.execute(sa.delete(access_grants).where(access_grants.c.name == name, access_grants.c.resource == on))
        conn.execute(access_grants.insert().values(name=name, resource=on, role=grant.value))
    return get_user(eng, name)


def remove_user(eng: Any, name: str) -> None:
    """Delete a user, their grants and every token they hold."""
    import sqlalchemy as sa

    from mlplatform._internal.metadata.tables import access_grants, access_tokens, access_users

    name = user_name(name)
    with metadata.write_transaction(eng) as conn:
        _known(conn, name)
        # Explicit deletes rather than ON DELETE CASCADE: SQLite honours it only with foreign keys on.
        for table in (access_tokens, access_grants, access_users):
            conn.execute(sa.delete(table).where(table.c.name == name))


def get_user(eng: Any, name: str) -> User:
    with metadata.read_transaction(eng) as conn:
        _known(conn, name)
        return _users(conn, name)[0]


def list_users(eng: Any) -> list[User]:
    with metadata.read_transaction(eng) as conn:
        return _users(conn, None)


def user_for_token(eng: Any, token: str) -> User | None:
    """The user holding `token`, or None when it matches no stored token (removed, mistyped, forged)."""
    import sqlalchemy as sa

    from mlplatform._internal.metadata.tables import access_tokens

    match = _TOKEN.match(token.strip())
    if not match:
        return None
    token_id, secret = match.groups()
    with metadata.read_transaction(eng) as conn:
        row = conn.execute(sa.select(access_tokens).where(access_tokens.c.token_id == token_id)).mappings().first()
        if row is None or not hmac.compare_digest(row["sha256"], digest(row["salt"], secret)):
            return None
        return _users(conn, row["name"])[0]


def digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _issue(conn: Any, name: str) -> str:
    from mlplatform._internal.metadata.tables import access_tokens

    token_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
    conn.execute(access_tokens.insert().values(
        token_id=token_id, name=name, salt=salt, sha256=digest(salt, secret), created_at=_now()))
    return f"{PREFIX}.{token_id}.{secret}"


def _exists(conn: Any, name: str) -> bool:
    import sqlalchemy as sa

    from mlplatform._internal.metadata.tables import access_users

    return conn.execute(sa.select(access_users.c.name).where(access_users.c.name == name)).first() is not None


def _known(conn: Any, name: str) -> None:
    if not _exists(conn, name):
        raise AccessError(f"No user {name!r}; `mlplatform users list` shows who exists.")


def _users(conn: Any, name: str | None) -> list[User]:
    import sqlalchemy as sa

    from mlplatform._internal.metadata.tables import access_grants, access_tokens, access_users

    where = (lambda t: t.c.name == name) if name else (lambda t: sa.true())
    grants: dict[str, dict[str, Role]] = {}
    for g in conn.execute(sa.select(access_grants).where(where(access_grants))).mappings():
        grants.setdefault(g["name"], {})[g["resource"]] = Role(g["role"])
    counts = dict(conn.execute(
        sa.select(access_tokens.c.name, sa.func.count()).where(where(access_tokens)).group_by(access_tokens.c.name)
    ).all())
    rows = conn.execute(sa.select(access_users).where(where(access_users)).order_by(access_users.c.name)).mappings()
    return [User(r["name"], dict(sorted(grants.get(r["name"], {}).items())), r["created_at"], r["created_by"],
                 counts.get(r["name"], 0)) for r in rows]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
