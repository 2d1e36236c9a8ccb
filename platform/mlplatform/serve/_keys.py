"""API keys scoped per application, stored hashed; the plaintext is shown once at creation.

A key reads `mlp.<app>.<key_id>.<secret>`. The key file `<keys_dir>/<app>.json` holds, per
key, a random salt and sha256(salt + secret): the secret is 256 random bits, so a salted
fast hash is enough (scrypt would add milliseconds to every request for no gain).
The app name inside the key lets an ingress tell "a valid key of another application"
(403) from "no valid key" (401).

Each key also carries its scopes (`predict`, `metrics`, `admin`), an optional expiry, an
optional quota (see _quota.py) and, once rotated, the id of the key that replaced it.
Key files written before scopes existed (format 1) are read as format 2: their keys get
`predict` and `metrics`, which is everything such a key could reach then (predictions
needed a key, the contract and health endpoints were open), so no deployed client breaks;
never `admin`, which did not exist. The file is rewritten as format 2 on its next change.
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
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from mlplatform import access
from mlplatform._internal import storage
from mlplatform.errors import ApiKeyError
from mlplatform.serve._quota import Quota

_PREFIX = "mlp"
_APP = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_FORMAT = 2

SCOPES = ("predict", "metrics", "admin")
DEFAULT_SCOPES = ("predict",)
LEGACY_SCOPES = ("predict", "metrics")  # what a format-1 key could reach; see the module docstring
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class KeyRecord:
    """One stored key, without its secret."""

    key_id: str
    app: str
    label: str
    created_at: str
    revoked_at: str | None
    scopes: tuple[str, ...] = LEGACY_SCOPES
    expires_at: str | None = None
    quota: Quota | None = None
    rotated_to: str | None = None

    @property
    def expired(self) -> bool:
        return self.expires_at is not None and _parse_time(self.expires_at) <= datetime.now(timezone.utc)

    @property
    def active(self) -> bool:
        return self.revoked_at is None and not self.expired

    @property
    def state(self) -> str:
        return "revoked" if self.revoked_at else "expired" if self.expired else "active"


@dataclass(frozen=True)
class CreatedKey:
    """A new key: `key` is the plaintext, returned only here."""

    key: str
    record: KeyRecord

    def __repr__(self) -> str:  # never print the secret by accident (logs, tracebacks, notebooks)
        return f"CreatedKey(key='mlp.{self.record.app}.{self.record.key_id}.***', record={self.record!r})"


def default_keys_dir() -> Path:
    """$MLPLATFORM_HOME/serve/keys (default ~/.mlplatform/serve/keys)."""
    return storage.home() / "serve" / "keys"


def create_key(
    app: str, *, label: str = "", scopes: Iterable[str] = DEFAULT_SCOPES,
    expires: str | datetime | timedelta | None = None, quota: Quota | None = None,
    keys_dir: str | os.PathLike | None = None,
) -> CreatedKey:
    """Create an API key for application `app`; returns the plaintext key once.

    Args:
        scopes: any of `predict`, `metrics`, `admin` (default predict only).
        expires: when the key stops working: a duration ("30d", "12h", a timedelta) or an
            ISO 8601 time ("2026-12-31T00:00:00Z", a datetime); None: never.
        quota: requests/s and burst for this key (None: unlimited).

    Raises:
        ApiKeyError: a bad app name, scope or expiry, or the key file cannot be written.
    """
    path = _path(app, keys_dir)
    access.require("serve.keys.create", f"serve:{app}")
    scopes = parse_scopes(scopes)
    expires_at = parse_expiry(expires)
    if quota is not None and not isinstance(quota, Quota):
        raise ApiKeyError(f"Got {quota!r} for `quota`; must be a Quota, e.g. Quota.of(10, burst=20).")
    with _locked(path):
        data = _read(path, app)
        key, entry = _new_entry(app, label, scopes, expires_at, quota)
        data["keys"].append(entry)
        _write(path, data)
    return CreatedKey(key, _record(app, entry))


def rotate_key(app: str, key_id: str, *, grace: str | timedelta | float = "1h",
               keys_dir: str | os.PathLike | None = None) -> CreatedKey:
    """Replace key `key_id` of `app` by a new key with the same label, scopes and quota.

    The old key keeps working for `grace` (a duration: "1h", seconds, a timedelta; 0 ends it
    now) so clients can switch over. A key that had an expiry passes its lifetime on: the
    new key expires as long after its creation as the old one did after its own.

    Raises:
        ApiKeyError: no such key, the key is revoked or expired, or a bad grace.
    """
    path = _path(app, keys_dir)
    access.require("serve.keys.rotate", f"serve:{app}")
    grace_s = parse_duration(grace, "grace")
    with _locked(path):
        data = _read(path, app)
        old = _find(data, app, key_id, path)
        record = _record(app, old)
        if not record.active:
            raise ApiKeyError(
                f"Key {key_id} of {app!r} is {record.state}; only an active key can be rotated. "
                f"Create a new one with `mlplatform serve keys create {app}`."
            )
        now = datetime.now(timezone.utc)
        expires_at = None
        if record.expires_at:
            expires_at = now + (_parse_time(record.expires_at) - _parse_time(record.created_at))
        key, entry = _new_entry(app, record.label, record.scopes, expires_at, record.quota, rotated_from=key_id)
        data["keys"].append(entry)
        end = now + timedelta(seconds=grace_s)
        if record.expires_at is None or _parse_time(record.expires_at) > end:
            old["expires_at"] = _iso(end)
        old["rotated_to"] = entry["key_id"]
        _write(path, data)
    return CreatedKey(key, _record(app, entry))


def revoke_key(app: str, key_id: str, *, keys_dir: str | os.PathLike | None = None) -> KeyRecord:
    """Revoke one key of `app`; every running ingress replica refuses it within about a second.

    Raises:
        ApiKeyError: no such key id for `app`.
    """
    path = _path(app, keys_dir)
    access.require("serve.keys.revoke", f"serve:{app}")
    with _locked(path):
        data = _read(path, app)
        entry = _find(data, app, key_id, path)
        entry["revoked_at"] = entry["revoked_at"] or _iso(datetime.now(timezone.utc))
        _write(path, data)
        return _record(app, entry)


def list_keys(app: str, *, keys_dir: str | os.PathLike | None = None) -> list[KeyRecord]:
    """Every key of `app` (active, expired and revoked), oldest first, without secrets."""
    path = _path(app, keys_dir)
    return [_record(app, e) for e in _read(path, app)["keys"]]


def parse_scopes(scopes: Iterable[str] | str) -> tuple[str, ...]:
    """Validated, de-duplicated scopes in canonical order.

    Raises:
        ApiKeyError: empty, or a scope that is not predict, metrics or admin.
    """
    given = [scopes] if isinstance(scopes, str) else list(scopes or [])
    given = [s.strip() for item in given for s in str(item).split(",") if s.strip()]
    bad = [s for s in given if s not in SCOPES]
    if bad or not given:
        raise ApiKeyError(f"Got {bad or given} for `scopes`; each must be one of {', '.join(SCOPES)} "
                          "(e.g. `--scope predict --scope metrics`).")
    return tuple(s for s in SCOPES if s in given)


def parse_duration(value: str | timedelta | float | int, field: str = "duration") -> float:
    """Seconds in "90s", "15m", "1h", "30d", "2w", a number of seconds or a timedelta.

    Raises:
        ApiKeyError: not one of those, or negative.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ApiKeyError(f"Got {value!r} for `{field}`; must be a duration like 90s, 15m, 1h, 30d or 2w.")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds < 0:
        raise ApiKeyError(f"Got {value!r} for `{field}`; must not be negative.")
    return seconds


def parse_expiry(value: str | datetime | timedelta | None) -> datetime | None:
    """When a key given `expires=value` stops working (UTC), or None for never.

    Raises:
        ApiKeyError: neither a duration nor an ISO 8601 time, or not in the future.
    """
    if value is None or value == "":
        return None
    now = datetime.now(timezone.utc)
    if isinstance(value, datetime):
        at = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    elif isinstance(value, timedelta) or (isinstance(value, str) and _DURATION.match(value)):
        at = now + timedelta(seconds=parse_duration(value, "expires"))
    else:
        try:
            at = _parse_time(str(value))
        except ValueError:
            raise ApiKeyError(f"Got {value!r} for `expires`; must be a duration (30d, 12h) or an ISO 8601 time "
                              "such as 2026-12-31T00:00:00Z.") from None
    if at <= now:
        raise ApiKeyError(f"Got {value!r} for `expires`; it is not in the future (now {_iso(now)}).")
    return at


@dataclass(frozen=True)
class Verdict:
    """What KeyChecker found: `outcome` (one of KeyChecker's constants) and the key, if it is genuine."""

    outcome: str
    record: KeyRecord | None = None  # set once the secret matched (so details go only to its holder)

    @property
    def key_id(self) -> str | None:
        return self.record.key_id if self.record else None


class KeyChecker:
    """Checks presented keys against the key files; re-reads a file when it changes.

    The cache holds only applications whose key file exists, so forged keys naming made-up
    applications add nothing to it. Files are read in a worker thread: `check` runs in the
    ingress's event loop, which a slow disk must not stall. A changed file (a revocation,
    a rotation) is seen within `recheck_s` by every replica, each checking on its own.

    Off the request's path: a background task on the ingress's loop re-reads the cached files
    every recheck_s / 2, so a request normally finds them fresh and touches no disk and no
    thread; and a key whose secret matched once is remembered (presented string → its entry in
    that very file version), so a repeat caller costs two dict look-ups, not a parse and a hash.
    A new file version (any change) forgets every remembered key with it.
    """

    OK, MISSING, INVALID = "ok", "missing", "invalid"
    REVOKED, EXPIRED = "revoked", "expired"  # genuine key, no longer valid: 401
    FORBIDDEN, SCOPE = "forbidden", "scope"  # genuine key, another app's / lacks the scope: 403
    _MAX_VERIFIED = 4096  # remembered genuine keys; only keys whose secret matched get in

    def __init__(self, app: str, keys_dir: str | os.PathLike, recheck_s: float = 1.0):
        self.app, self.dir, self.recheck_s = app, Path(keys_dir), recheck_s
        self._cache: dict[str, tuple[float, int, dict[str, dict[str, Any]]]] = {}  # app → (checked, mtime, keys)
        # presented key → (app, the keys dict it was verified against, its entry)
        self._verified: dict[str, tuple[str, dict[str, dict[str, Any]], dict[str, Any]]] = {}
        self._refresher: asyncio.Task | None = None

    async def check(self, presented: str | None, scopes: Iterable[str] = ("predict",)) -> Verdict:
        """Whether `presented` is a valid key of this app holding one of `scopes`."""
        if not presented:
            return Verdict(self.MISSING)
        self._ensure_refresher()
        known = self._verified.get(presented)
        if known is not None:
            app, verified_in, entry = known
            keys, _ = await self._keys(app)
            if keys is not verified_in:  # the file changed since: verify again against the new version
                known = None
        if known is None:
            parts = presented.strip().split(".")
            if len(parts) != 4 or parts[0] != _PREFIX or not _APP.match(parts[1]) or not _KEY_ID.match(parts[2]):
                return Verdict(self.INVALID)
            _, app, key_id, secret = parts
            keys, from_cache = await self._keys(app)
            if key_id not in keys and from_cache:  # a key created since the last read must work at once
                keys, _ = await self._keys(app, fresh=True)
            entry = keys.get(key_id)
            if entry is None or not hmac.compare_digest(entry["sha256"], _digest(entry["salt"], secret)):
                return Verdict(self.INVALID)
            if len(self._verified) >= self._MAX_VERIFIED:
                self._verified.clear()
            self._verified[presented] = (app, keys, entry)
        record = entry["_record"]
        if record.revoked_at:
            return Verdict(self.REVOKED, record)
        if entry["_expires"] is not None and time.time() >= entry["_expires"]:
            return Verdict(self.EXPIRED, record)
        if app != self.app:
            return Verdict(self.FORBIDDEN, record)
        if not set(scopes) & set(record.scopes):
            return Verdict(self.SCOPE, record)
        return Verdict(self.OK, record)

    def _ensure_refresher(self) -> None:
        """Keep the cached files fresh from a background task (none when every check re-reads)."""
        if self.recheck_s <= 0 or (self._refresher is not None and not self._refresher.done()):
            return
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_s / 2)
            for app in list(self._cache):
                try:
                    await self._keys(app, fresh=True)
                except Exception:  # a failing disk must not end the refresher; requests re-read inline
                    pass

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
        keys = {}
        try:
            for e in json.loads(path.read_text())["keys"]:
                record = _record(app, e)
                # Parsed once per file change, not per request.
                expires = _parse_time(record.expires_at).timestamp() if record.expires_at else None
                keys[e["key_id"]] = {"sha256": e["sha256"], "salt": e["salt"], "_record": record, "_expires": expires}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ApiKeyError):
            keys = {}  # unreadable file: refuse every key rather than crash the ingress
        return mtime, keys


def _new_entry(app: str, label: str, scopes: tuple[str, ...], expires_at: datetime | None, quota: Quota | None,
               rotated_from: str | None = None) -> tuple[str, dict[str, Any]]:
    """(the plaintext key, its stored entry: salted hash only)."""
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
    entry = {"key_id": key_id, "label": label, "salt": salt, "sha256": _digest(salt, secret),
             "created_at": _iso(datetime.now(timezone.utc)), "revoked_at": None, "scopes": list(scopes),
             "expires_at": _iso(expires_at) if expires_at else None,
             "quota": {"rate": quota.rate, "burst": quota.burst} if quota else None,
             "rotated_from": rotated_from, "rotated_to": None}
    return f"{_PREFIX}.{app}.{key_id}.{secret}", entry


def _find(data: dict[str, Any], app: str, key_id: str, path: Path) -> dict[str, Any]:
    for entry in data["keys"]:
        if entry["key_id"] == key_id:
            return entry
    known = [e["key_id"] for e in data["keys"]]
    raise ApiKeyError(
        f"Got {key_id!r} for `key_id`; application {app!r} has no such key. Known key ids: {known or 'none'} "
        f"(list them with `mlplatform serve keys list {app}`)."
    )


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
        return {"format": _FORMAT, "app": app, "keys": []}
    except (OSError, ValueError) as e:
        raise ApiKeyError(f"{path}: key file cannot be read ({e}); restore it from backup or delete it.") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ApiKeyError(f"{path}: not a key file (no `keys` list).")
    if data.get("format", 1) > _FORMAT:
        raise ApiKeyError(f"{path}: key file format {data['format']} is newer than this mlplatform reads "
                          f"({_FORMAT}); upgrade mlplatform.")
    data["format"] = _FORMAT  # format 1 → 2: missing fields are read with their defaults (see _record)
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    # Readers (every ingress replica) see the old or the new file, never half of one.
    storage.write_private(path, json.dumps(data, indent=1))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer of `path` at a time across processes (create, rotate and revoke read, change, write)."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock.touch(mode=0o600, exist_ok=True)
    except OSError as e:
        raise ApiKeyError(f"{path.parent}: cannot write key files ({e.strerror}); pass a writable `keys_dir`.") from None
    with storage.file_lock(lock):
        yield


def _record(app: str, e: dict[str, Any]) -> KeyRecord:
    # Format-1 entries have no scopes, expiry, quota or rotation: LEGACY_SCOPES and none.
    quota = e.get("quota")
    return KeyRecord(
        e["key_id"], app, e.get("label", ""), e["created_at"], e.get("revoked_at"),
        scopes=tuple(e["scopes"]) if "scopes" in e else LEGACY_SCOPES, expires_at=e.get("expires_at"),
        quota=Quota(float(quota["rate"]), int(quota["burst"])) if quota else None, rotated_to=e.get("rotated_to"),
    )


def _parse_time(text: str) -> datetime:
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=timezone.utc)


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="seconds")
