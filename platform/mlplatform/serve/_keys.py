"""API keys scoped per application, stored hashed; the plaintext is shown once at creation.

A key reads `mlp.<app>.<key_id>.<secret>`. The key file `<keys_dir>/<app>.json` holds, per
key, a random salt and sha256(salt + secret): the secret is 256 random bits, so a salted
fast hash is enough (scrypt would add milliseconds to every request for no gain).
The app name inside the key lets an ingress tell "a valid key of another application"
(403) from "no valid key" (401).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from mlplatform._internal import storage
from mlplatform.errors import ApiKeyError

_PREFIX = "mlp"
_APP = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class KeyRecord:
    """One stored key, without its secret."""

    key_id: str
    app: str
    label: str
    created_at: str
    revoked_at: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True)
class CreatedKey:
    """A new key: `key` is the plaintext, returned only here."""

    key: str
    record: KeyRecord


def default_keys_dir() -> Path:
    """$MLPLATFORM_HOME/serve/keys (default ~/.mlplatform/serve/keys)."""
    return storage.home() / "serve" / "keys"


def create_key(app: str, *, label: str = "", keys_dir: str | os.PathLike | None = None) -> CreatedKey:
    """Create an API key for application `app`; returns the plaintext key once.

    Raises:
        ApiKeyError: `app` is not a valid application name or the key file cannot be written.
    """
    path = _path(app, keys_dir)
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    now = _now()
    with _locked(path):
        data = _read(path, app)
        data["keys"].append({"key_id": key_id, "label": label, "salt": salt, "sha256": _digest(salt, secret),
                             "created_at": now, "revoked_at": None})
        _write(path, data)
    return CreatedKey(f"{_PREFIX}.{app}.{key_id}.{secret}", KeyRecord(key_id, app, label, now, None))


def revoke_key(app: str, key_id: str, *, keys_dir: str | os.PathLike | None = None) -> KeyRecord:
    """Revoke one key of `app`; running ingresses refuse it within about a second.

    Raises:
        ApiKeyError: no such key id for `app`.
    """
    path = _path(app, keys_dir)
    with _locked(path):
        data = _read(path, app)
        for entry in data["keys"]:
            if entry["key_id"] == key_id:
                entry["revoked_at"] = entry["revoked_at"] or _now()
                _write(path, data)
                return _record(app, entry)
    known = [e["key_id"] for e in data["keys"]]
    raise ApiKeyError(
        f"Got {key_id!r} for `key_id`; application {app!r} has no such key. Known key ids: {known or 'none'} "
        f"(list them with `mlplatform serve keys list {app}`)."
    )


def list_keys(app: str, *, keys_dir: str | os.PathLike | None = None) -> list[KeyRecord]:
    """Every key of `app` (active and revoked), oldest first, without secrets."""
    path = _path(app, keys_dir)
    return [_record(app, e) for e in _read(path, app)["keys"]]


class KeyChecker:
    """Checks presented keys against the key files; re-reads a file when it changes.

    The cache holds only applications whose key file exists, so forged keys naming made-up
    applications add nothing to it. Files are read in a worker thread: `check` runs in the
    ingress's event loop, which a slow disk must not stall.
    """

    OK, MISSING, INVALID, FORBIDDEN = "ok", "missing", "invalid", "forbidden"

    def __init__(self, app: str, keys_dir: str | os.PathLike, recheck_s: float = 1.0):
        self.app, self.dir, self.recheck_s = app, Path(keys_dir), recheck_s
        self._cache: dict[str, tuple[float, int, dict[str, dict[str, Any]]]] = {}  # app → (checked, mtime, keys)

    async def check(self, presented: str | None) -> tuple[str, str | None]:
        """(verdict, key_id): OK, MISSING (no key), INVALID (unknown/revoked), FORBIDDEN (another app's key)."""
        if not presented:
            return self.MISSING, None
        parts = presented.strip().split(".")
        if len(parts) != 4 or parts[0] != _PREFIX or not _APP.match(parts[1]) or not _KEY_ID.match(parts[2]):
            return self.INVALID, None
        _, app, key_id, secret = parts
        keys, from_cache = await self._keys(app)
        if key_id not in keys and from_cache:  # a key created since the last read must work at once
            keys, _ = await self._keys(app, fresh=True)
        entry = keys.get(key_id)
        if entry is None or entry.get("revoked_at") or not hmac.compare_digest(
            entry["sha256"], _digest(entry["salt"], secret)
        ):
            return self.INVALID, None
        return (self.OK if app == self.app else self.FORBIDDEN), key_id

    async def _keys(self, app: str, fresh: bool = False) -> tuple[dict[str, dict[str, Any]], bool]:
        """(the app's keys by id, whether they came from the cache without touching the disk)."""
        now = time.monotonic()
        cached = self._cache.get(app)
        if cached and not fresh and now - cached[0] < self.recheck_s:
            return cached[2], True
        loaded = await asyncio.to_thread(self._load, app, cached)
        if loaded is None:  # no key file: no such application, nothing worth remembering
            self._cache.pop(app, None)
            return {}, False
        self._cache[app] = (now, *loaded)
        return loaded[1], False

    def _load(
        self, app: str, cached: tuple[float, int, dict[str, dict[str, Any]]] | None
    ) -> tuple[int, dict[str, dict[str, Any]]] | None:
        """(mtime, keys) of the app's key file, re-read only if it changed; None if there is none."""
        path = self.dir / f"{app}.json"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        if cached and cached[1] == mtime:
            return mtime, cached[2]
        try:
            keys = {e["key_id"]: e for e in json.loads(path.read_text())["keys"]}
        except (OSError, ValueError, KeyError, TypeError):
            keys = {}  # unreadable file: refuse every key rather than crash the ingress
        return mtime, keys


def _path(app: str, keys_dir: str | os.PathLike | None) -> Path:
    if not _APP.match(app or ""):
        raise ApiKeyError(f"Got {app!r} for `app`; must be a Serve application name (lowercase letters, digits, '-').")
    return Path(storage.absolute(keys_dir) if keys_dir else default_keys_dir()) / f"{app}.json"


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def _read(path: Path, app: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"format": 1, "app": app, "keys": []}
    except (OSError, ValueError) as e:
        raise ApiKeyError(f"{path}: key file cannot be read ({e}); restore it from backup or delete it.") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ApiKeyError(f"{path}: not a key file (no `keys` list).")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    # Readers (every ingress replica) see the old or the new file, never half of one.
    storage.write_private(path, json.dumps(data, indent=1))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer of `path` at a time across processes (create and revoke read, change, write)."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock.touch(mode=0o600, exist_ok=True)
    except OSError as e:
        raise ApiKeyError(f"{path.parent}: cannot write key files ({e.strerror}); pass a writable `keys_dir`.") from None
    with storage.file_lock(lock):
        yield


def _record(app: str, e: dict[str, Any]) -> KeyRecord:
    return KeyRecord(e["key_id"], app, e.get("label", ""), e["created_at"], e.get("revoked_at"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

