"""Finds API-key, cluster-token and private-key material in log files (for test_zz_no_secrets_in_logs).

A finding names the file, the line and what kind of secret is there, never the secret itself:
the failure message is one more log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# mlp.<app>.<key id>.<secret>: a real secret is 43 urlsafe characters; 20+ leaves out the short
# made-up keys tests send on purpose (mlp.digits.0123456789ab.nope) and masked ones (`***`).
API_KEY = re.compile(rb"mlp\.[a-z0-9][a-z0-9-]{0,62}\.[0-9a-f]{12}\.[A-Za-z0-9_-]{20,}")
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Logs only: key files, token files and certificates are secrets at rest, not leaks.
LOG_SUFFIXES = {".log", ".out", ".err", ".txt"}


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def scan(files: Iterable[Path], tokens: Iterable[str] = ()) -> list[Finding]:
    """Every line of `files` holding an API key, a private key or one of `tokens` (cluster tokens)."""
    exact = [t.encode() for t in tokens if len(t) >= 16]
    found = []
    for path in files:
        try:
            f = open(path, "rb")
        except OSError:  # rotated or removed while we looked: nothing left to leak
            continue
        with f:
            for n, line in enumerate(f, 1):
                if b"mlp." in line:
                    for m in API_KEY.finditer(line):
                        app, key_id = m.group().split(b".")[1:3]
                        found.append(Finding(path, n, f"API key mlp.{app.decode()}.{key_id.decode()}.*** "
                                                      f"(column {m.start() + 1})"))
                if b"PRIVATE KEY-----" in line and PRIVATE_KEY.search(line):
                    found.append(Finding(path, n, "a PEM private key"))
                for token in exact:
                    if token in line:
                        found.append(Finding(path, n, f"a cluster auth token (column {line.index(token) + 1})"))
    return found


def session_logs(home: Path, extra: Iterable[Path] = ()) -> tuple[list[Path], list[str]]:
    """(log files, cluster tokens) of the clusters under `home` (the session's MLPLATFORM_HOME):
    each cluster's own log folder and, for a running one, the Ray session logs in the temp
    dir its state file names (`cluster down` deletes both), plus the `extra` files."""
    files: dict[Path, Path] = {p.resolve(): p for p in extra if p.is_file()}
    tokens: list[str] = []
    for cdir in sorted(p for p in (home / "clusters").glob("*") if p.is_dir()):
        roots = [cdir / "logs"]
        try:
            state = json.loads((cdir / "state.json").read_text())
        except (OSError, ValueError):
            state = {}
        token = Path(state.get("token_path") or cdir / "auth_token")
        if token.is_file():
            tokens.append(token.read_text().strip())
        if state.get("temp_dir"):
            roots.append(Path(state["temp_dir"]))
        for root in roots:
            for p in root.rglob("*"):
                # Ray's session folders reach their logs through `session_latest` links too.
                if p.suffix in LOG_SUFFIXES and p.is_file() and (root.name == "logs" or "logs" in p.parts):
                    files.setdefault(p.resolve(), p)
    return list(files.values()), tokens
