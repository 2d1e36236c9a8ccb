"""Who is calling: the token a process presents, or the operator's bootstrap token.

A caller presents a token in MLPLATFORM_TOKEN, or in a file named by MLPLATFORM_TOKEN_FILE
(what a `ray job submit` job should carry: the path travels in its runtime_env, the token does
not, because a runtime_env is job metadata anyone who can list jobs reads).

Bootstrap: with no token presented, whoever can write the platform home on this machine is its
operator (they hold the metadata store and storage credentials anyway), so the call runs as the
global admin `operator`, whose token is created on first use in a 0600 file under
$MLPLATFORM_HOME/access/. MLPLATFORM_ACCESS_BOOTSTRAP=off turns that off (shared clusters,
KubeRay pods), so a process without a token is refused instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlplatform._internal import metadata, storage
from mlplatform.access import _store
from mlplatform.access._roles import Role
from mlplatform.errors import PlatformError

TOKEN_ENV = "MLPLATFORM_TOKEN"
TOKEN_FILE_ENV = "MLPLATFORM_TOKEN_FILE"
BOOTSTRAP_ENV = "MLPLATFORM_ACCESS_BOOTSTRAP"
OPERATOR = "operator"


class AuthenticationError(PlatformError):
    """The caller presented no usable token (none, unreadable, or matching no user)."""


@dataclass(frozen=True)
class Caller:
    """The identity a call runs as and how it was presented (never the token itself)."""

    user: _store.User
    via: str
    bootstrapped: bool = False


def current(eng: Any) -> Caller:
    """The caller of this process.

    Raises:
        AuthenticationError: a presented token matches no user, its file cannot be read, or no
            token is presented while the operator bootstrap is off.
    """
    token, via = _presented()
    if token is not None:
        user = _store.user_for_token(eng, token)
        if user is None:
            raise AuthenticationError(
                f"The token in {via} matches no user of the metadata store {metadata.describe(eng)}: it was "
                f"removed, mistyped, or issued by another store. Ask an admin for a new one "
                f"(`mlplatform users add NAME --role ROLE`), or unset {TOKEN_ENV}/{TOKEN_FILE_ENV} to act as "
                f"this machine's operator."
            )
        return Caller(user, via)
    return _operator(eng)


def operator_file(eng: Any) -> Path:
    """The operator's token file for this metadata store (one per store: a token is only valid in its own)."""
    store_id = hashlib.sha256(metadata.describe(eng).encode()).hexdigest()[:12]
    return storage.home() / "access" / f"operator-{store_id}.token"


def bootstrap_enabled() -> bool:
    return os.environ.get(BOOTSTRAP_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def _presented() -> tuple[str | None, str]:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], TOKEN_ENV
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            return Path(path).expanduser().read_text().strip(), f"{TOKEN_FILE_ENV} ({path})"
        except OSError as e:
            raise AuthenticationError(
                f"Got {path!r} for {TOKEN_FILE_ENV}; it cannot be read ({e.strerror}). Point it at the 0600 file "
                f"holding your token, or unset it."
            ) from None
    return None, ""


def _operator(eng: Any) -> Caller:
    if not bootstrap_enabled():
        raise AuthenticationError(
            f"No token presented and the operator bootstrap is off here ({BOOTSTRAP_ENV}=off). Set {TOKEN_ENV} "
            f"or {TOKEN_FILE_ENV} to a token from `mlplatform users add NAME --role ROLE`."
        )
    path = operator_file(eng)
    via = f"the operator token file {path}"
    user = _valid(eng, path)
    if user is not None:
        return Caller(user, via)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # before the lock file lands in it
    with storage.file_lock(path.with_name(f".{path.name}.lock")):
        user = _valid(eng, path)  # another process may have bootstrapped while we waited
        if user is not None:
            return Caller(user, via)
        token = _store.ensure_user(eng, OPERATOR, Role.admin, by="bootstrap")
        _write_private(path, token + "\n")
        return Caller(_store.user_for_token(eng, token), via, bootstrapped=True)


def _valid(eng: Any, path: Path) -> _store.User | None:
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        return None
    return _store.user_for_token(eng, token)


def _write_private(path: Path, text: str) -> None:
    # A credential, not data: residency confinement does not apply (as for lock files), so this
    # does not go through storage.write_private. Written in place under the bootstrap lock, 0600
    # from creation: a reader that sees no file or half of one takes the lock and reads it again,
    # and a file left torn by a crash is a stale token that the next call replaces.
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
