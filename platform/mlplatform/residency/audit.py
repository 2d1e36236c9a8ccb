"""The residency audit trail: an append-only JSONL file whose records form a SHA-256 chain.

Each line is one record (canonical JSON: keys sorted, compact separators) carrying `prev`,
the `sha256` of the record before it, and its own `sha256` over everything else in it. Editing,
removing or reordering any record breaks the chain at that point, and `verify` names the first
line where it breaks. (Removing records from the *end* leaves a shorter valid chain; anyone who
keeps the last `seq`/`sha256` they saw can detect that.)

Writers on every process serialise on `<file>.lock`, so records are never interleaved, lost or
chained onto the same predecessor twice. A writer that dies mid-line leaves an incomplete last
line; later appends refuse to build on it rather than repair it, because a repair done
automatically would be indistinguishable from tampering.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlplatform._internal import storage
from mlplatform.errors import PlatformError

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64  # `prev` of the first record
RESERVED = frozenset({"seq", "at", "kind", "prev", "sha256", "host", "pid"})
LOCK_TIMEOUT_S = 30.0
_CHUNK = 8192
_VERIFY_HINT = "run `mlplatform residency audit --verify`"


class AuditError(PlatformError):
    """The audit trail is missing or damaged, or a record could not be written to it."""


@dataclass(frozen=True)
class AuditReport:
    """What `verify` found. `records`: records checked good (all of them when `ok`);
    `first_bad`: 1-based line number of the first bad record; `reason`: what is wrong with it."""

    ok: bool
    records: int
    first_bad: int | None = None
    reason: str | None = None


def default_path(cluster_name: str) -> Path:
    """Where a cluster's audit trail lives on this machine."""
    return storage.home() / "clusters" / cluster_name / "residency" / AUDIT_FILE


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "sha256"})).hexdigest()


def append(path: str | os.PathLike[str], kind: str, /, **fields: Any) -> dict[str, Any]:
    """Append one record of `kind` with `fields` to the trail at `path` and return it.

    `path` and `kind` are positional-only, so callers may use any field name except the
    reserved ones (seq, at, kind, prev, sha256, host, pid), which raise ValueError.
    """
    path = Path(path)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"Got {kind!r} for the audit record kind; use a non-empty string such as 'placement'.")
    clash = sorted(RESERVED & fields.keys())
    if clash:
        raise ValueError(
            f"Audit fields {clash} are reserved (the trail sets {sorted(RESERVED)} itself); rename them."
        )
    try:
        # Round-trip through JSON so that the record we hash is exactly what a reader will parse
        # back: tuples become lists, int keys become strings (and sort as strings).
        fields = json.loads(_canonical(fields))
    except (TypeError, ValueError) as e:
        raise AuditError(f"Audit record {kind!r} has a field that is not JSON-serialisable: {e}") from None

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with storage.file_lock(f"{path}.lock", timeout_s=LOCK_TIMEOUT_S):
        created = not path.exists()
        # O_APPEND: even a writer that somehow bypassed the lock could never overwrite a record.
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            last = _last_record(fd, path)
            record = {
                **fields,
                "seq": last["seq"] + 1 if last else 1,
                "at": datetime.now(UTC).isoformat(timespec="microseconds"),
                "kind": kind,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "prev": last["sha256"] if last else GENESIS,
            }
            record["sha256"] = _digest(record)
            line = _canonical(record) + b"\n"
            # One write call so that a crash leaves at most one incomplete line at the end,
            # which the next append detects.
            written = os.write(fd, line)
            if written != len(line):
                raise AuditError(
                    f"Wrote only {written} of {len(line)} bytes of an audit record to {path} (disk full?); "
                    f"the trail now ends with an incomplete record: {_VERIFY_HINT}."
                )
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            storage.fsync_dir(path.parent)
    return record


def _last_record(fd: int, path: Path) -> dict[str, Any] | None:
    """The last record in the open file, read from the end; None for an empty file.

    Refuses (AuditError) an incomplete or damaged last line: chaining onto it would make the
    damage look like part of a valid history.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        start = _line_start(fd, size)
        raise AuditError(
            f"The audit trail {path} ends with an incomplete record at byte {start} (a writer stopped "
            f"mid-write); refusing to append after it. Nothing was repaired: {_VERIFY_HINT}."
        )
    start = _line_start(fd, size - 1)
    raw = os.pread(fd, size - 1 - start, start)
    try:
        record = json.loads(raw)
        ok = isinstance(record, dict) and isinstance(record.get("seq"), int)
        ok = ok and record.get("sha256") == _digest(record)
    except ValueError:
        ok = False
    if not ok:
        raise AuditError(
            f"The last record of the audit trail {path} (at byte {start}) is damaged; refusing to "
            f"append after it. Nothing was repaired: {_VERIFY_HINT}."
        )
    return record


def _line_start(fd: int, end: int) -> int:
    """Offset of the first byte after the last newline before `end` (0 if there is none)."""
    pos = end
    while pos > 0:
        n = min(_CHUNK, pos)
        pos -= n
        i = os.pread(fd, n, pos).rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def _settled_size(path: Path) -> int:
    """How many bytes of `path` no writer is still writing.

    Taken under the writers' lock, every append that had started has finished; the file only
    grows, so that prefix stays the same while we read it without holding the lock (a long
    verification must not make writers time out).
    """
    if not path.is_file():
        raise AuditError(f"No audit trail at {path}.")
    try:
        with storage.file_lock(f"{path}.lock", timeout_s=LOCK_TIMEOUT_S):
            return path.stat().st_size
    except PermissionError:  # a reader who may not create the lock file: best effort
        return path.stat().st_size


def _lines(path: Path) -> Iterator[tuple[int, int, bytes, bool]]:
    """(line number, byte offset, line without its newline, whether it was complete)."""
    size = _settled_size(path)
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if offset >= size:
                return
            raw = raw[: size - offset]
            yield number, offset, raw.rstrip(b"\n"), raw.endswith(b"\n")
            offset += len(raw)


def verify(path: str | os.PathLike[str]) -> AuditReport:
    """Check the whole chain; the report names the first bad line and why it is bad."""
    path = Path(path)
    prev, count = GENESIS, 0

    def bad(number: int, reason: str) -> AuditReport:
        return AuditReport(ok=False, records=count, first_bad=number, reason=reason)

    for number, offset, raw, complete in _lines(path):
        if not complete:
            return bad(number, f"line {number} (byte {offset}) is incomplete: a writer stopped mid-write")
        try:
            record = json.loads(raw)
        except ValueError as e:
            return bad(number, f"line {number} (byte {offset}) is not valid JSON ({e})")
        if not isinstance(record, dict) or not isinstance(record.get("seq"), int) or not isinstance(
            record.get("sha256"), str
        ):
            return bad(number, f"line {number} (byte {offset}) is not an audit record (no seq or sha256)")
        seq = record["seq"]
        # The record's own hash first: an edited record is named itself, not the one after it.
        if record["sha256"] != _digest(record):
            why = "its sha256 does not match its content (edited after it was written)"
            return bad(number, f"line {number} (seq {seq}): {why}")
        if record.get("prev") != prev:
            before = f"line {number - 1}'s sha256" if number > 1 else "the start of the chain"
            why = f"prev does not match {before} (a record was removed or reordered)"
            return bad(number, f"line {number} (seq {seq}): {why}")
        if seq != number:
            why = f"seq is {seq}, expected {number} (a record was removed, duplicated or reordered)"
            return bad(number, f"line {number}: {why}")
        prev, count = record["sha256"], count + 1
    return AuditReport(ok=True, records=count)


def read(path: str | os.PathLike[str], kind: str | None = None, /, **match: Any) -> Iterator[dict[str, Any]]:
    """The records in order, optionally only those of `kind` whose fields equal `match`.

    Does not check the chain (use `verify`); a line that does not parse raises AuditError.
    """
    path = Path(path)
    if kind is not None:
        match["kind"] = kind
    lines = _lines(path)
    next_line = next(lines, None)  # fail now, not at first iteration, when there is no trail

    def records() -> Iterator[dict[str, Any]]:
        line = next_line
        while line is not None:
            number, offset, raw, complete = line
            try:
                record = json.loads(raw) if complete else None
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise AuditError(
                    f"Line {number} (byte {offset}) of the audit trail {path} is damaged: {_VERIFY_HINT}."
                )
            if all(k in record and record[k] == v for k, v in match.items()):
                yield record
            line = next(lines, None)

    return records()
