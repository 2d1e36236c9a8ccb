"""Where the platform reads and writes: paths and URIs, atomic writes, locks, private files.

Every capability turns a user's path or URI into a pyarrow filesystem here, writes files that
readers must never see half-written here, and locks here, so that residency checks (which
region a URI is in) and the metadata store have one place to hook into.

Confinement: inside `confine(prefixes, reason)` every writer here refuses, before writing a
byte, a location outside `prefixes` (ResidencyError). The residency capability opens one for
data of a classification (`residency.confined`); this layer knows prefixes, not policies.
Confinement holds for the code running in the block (a ContextVar): other threads and processes
(Ray workers) are not confined by it and enter their own.
"""

from __future__ import annotations

import contextvars
import os
import posixpath
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mlplatform.errors import PlatformError, ResidencyError

HOME_ENV = "MLPLATFORM_HOME"


def home() -> Path:
    """The platform's own directory on this machine (cluster state, key files, the embedded database)."""
    return Path(os.environ.get(HOME_ENV) or "~/.mlplatform").expanduser()


def is_uri(text: str | os.PathLike[str]) -> bool:
    """Whether `text` names a location by scheme (s3://, gs://, file://, ...) rather than a local path."""
    return "://" in os.fspath(text)


def absolute(text: str | os.PathLike[str]) -> str:
    """A URI unchanged; a local path with `~` expanded and made absolute (pyarrow needs both)."""
    text = os.fspath(text)
    return text if is_uri(text) else str(Path(text).expanduser().absolute())


def normal_prefix(text: str | os.PathLike[str]) -> str:
    """A location as prefixes are compared: absolute, normalised, file:// as a plain path, ending in '/'.

    The trailing '/' makes a prefix match whole path components only (/data/uae never matches
    /data/uae-public); normalising '..' stops /data/uae/../elsewhere passing as inside /data/uae.
    """
    text = os.fspath(text)
    if text.startswith("file://"):
        text = text[len("file://"):] or "/"
    if is_uri(text):
        scheme, rest = text.split("://", 1)
        text = f"{scheme}://{posixpath.normpath(rest)}" if rest else text
    else:
        text = os.path.normpath(absolute(text))
    return text if text.endswith("/") else text + "/"


def within(location: str | os.PathLike[str], prefixes: Sequence[str]) -> bool:
    """Whether `location` lies under one of `prefixes` (no prefixes: anywhere)."""
    where = normal_prefix(location)
    return not prefixes or any(where.startswith(normal_prefix(p)) for p in prefixes)


@dataclass(frozen=True)
class Confinement:
    """Where writes may go for the current block, and why (shown in the refusal)."""

    prefixes: tuple[str, ...]  # normalised; empty: anywhere
    reason: str


# Nested confinements all apply (each may only narrow), so a stack rather than one value.
_CONFINED: contextvars.ContextVar[tuple[Confinement, ...]] = contextvars.ContextVar("mlplatform_confined", default=())


@contextmanager
def confine(prefixes: Sequence[str], reason: str) -> Iterator[Confinement]:
    """Refuse, for the block, every write of this layer outside `prefixes` (empty: anywhere).

    `reason` says whose data it is, e.g. "'uae-restricted' data under residency policy 'uae'".
    """
    confinement = Confinement(tuple(normal_prefix(p) for p in prefixes), reason)
    token = _CONFINED.set((*_CONFINED.get(), confinement))
    try:
        yield confinement
    finally:
        _CONFINED.reset(token)


def confinements() -> tuple[Confinement, ...]:
    """The confinements in force here, outermost first."""
    return _CONFINED.get()


def check_write(location: str | os.PathLike[str], field: str | None = None) -> None:
    """Refuse (ResidencyError) a write to `location` that a confinement in force forbids.

    Every writer here calls it before its first byte; code writing through a library (pyarrow,
    torch, ONNX Runtime) calls it on the destination first. `field` names the input it came from.
    """
    for c in _CONFINED.get():
        if not within(location, c.prefixes):
            given = f"Got {os.fspath(location)!r} for `{field}`" if field else f"Refusing to write {os.fspath(location)!r}"
            raise ResidencyError(
                f"{given}: {c.reason} may only be stored under {', '.join(c.prefixes)}. Nothing was written "
                f"there. Use a location under one of those prefixes."
            )


def temp_dir(prefix: str) -> Path:
    """A new private scratch directory where the confinements in force allow writing.

    Unconfined: the system's temporary directory. Confined: under the first local prefix every
    confinement allows, so scratch copies of restricted data stay inside its prefixes too.
    """
    confined = _CONFINED.get()
    places = [p for c in confined for p in c.prefixes if not is_uri(p)] + [tempfile.gettempdir()]
    base = next((p for p in places if all(within(p, c.prefixes) for c in confined)), None)
    if base is None:
        reasons = "; ".join(f"{c.reason}: {', '.join(c.prefixes)}" for c in confined if c.prefixes)
        raise ResidencyError(
            f"No local directory is allowed for scratch files ({reasons}). Add a local path prefix to the "
            f"classification's `storage_prefixes` in the residency policy, or run where one is allowed."
        )
    Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@contextmanager
def tempfile_dir(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Point Python's default temporary directory (`tempfile.tempdir`) at `directory` for the block.

    Libraries (ONNX Runtime quantization, the torch ONNX exporter) write scratch copies of a
    model through `tempfile`, which this layer never sees; this keeps those inside `directory`.
    Process-wide: for a single-purpose driver (an export), not beside unrelated threads.
    """
    check_write(directory)
    before = tempfile.tempdir
    tempfile.tempdir = os.fspath(directory)
    try:
        yield
    finally:
        tempfile.tempdir = before


@contextmanager
def open_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A local file (parents created, replaced if present) for a streaming writer; fsynced on close.

    Not atomic by itself: for files inside a directory that `staging_dir`/`replace_dir` or a
    rename publishes later.
    """
    check_write(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a local file's bytes to `dst`, parents created."""
    check_write(dst)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def filesystem(
    text: str | os.PathLike[str], field: str = "path", error: type[PlatformError] = PlatformError
) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) for a local path or a URI.

    A URI pyarrow cannot open raises `error` naming `field`, the value and the schemes to use.
    """
    import pyarrow.fs as pafs

    text = os.fspath(text)
    if not is_uri(text):
        return pafs.LocalFileSystem(), absolute(text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as e:  # pyarrow raises ArrowInvalid, ArrowNotImplementedError, OSError, ValueError
        raise error(
            f"Got {text!r} for `{field}`; pyarrow cannot open it ({e}). Use a local path or a "
            f"supported URI (file://, s3://, gs://, hdfs://)."
        ) from None
    return fs, path.rstrip("/") or "/"


def atomic_write(path: str | os.PathLike[str], data: bytes | str, mode: int = 0o644) -> None:
    """Replace the local file `path` so that readers see the old bytes or all the new ones.

    The bytes are fsynced before the rename and the rename is made durable, so a crash leaves
    one of the two versions, never a torn or empty file. `mode` applies from creation (a secret
    written with 0o600 is never readable by others, not even for a moment).
    """
    check_write(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_private(path: str | os.PathLike[str], data: bytes | str) -> None:
    """A secret (token, key file): atomic, mode 0600, in a directory only its owner can enter."""
    check_write(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, mode=0o600)


class LockBusy(PlatformError):
    """Another process holds the lock; the message names it (pid and host)."""


@contextmanager
def file_lock(path: str | os.PathLike[str], timeout_s: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on the local file `path` for the block, across processes.

    The kernel releases it when its holder dies, so a killed process never leaves a stale lock.
    `timeout_s` < 0 waits for ever, 0 fails at once; on timeout LockBusy names the holder, which
    each holder writes into `<path>.holder`. A lock holds no data, so no confinement applies to
    it (the audit trail must stay writable from confined work, for one).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = path.with_name(path.name + ".holder")
    lock = FileLock(str(path), mode=0o600)
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise LockBusy(f"{path} is held by {lock_holder(path)}") from None
    try:
        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield
    finally:
        lock.release()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename in `path` durable; filesystems that refuse it (some network ones) are fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike[str]) -> str:
    """Who holds (or last held) the lock `path`, as file_lock records it: "pid N on HOST"."""
    try:
        return Path(os.fspath(path) + ".holder").read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (pyarrow, torch, ...).

    Whatever the block writes there replaces `path` in one rename when the block ends; if the
    block fails, the temporary file is removed and `path` is left as it was.
    """
    check_write(path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A new empty directory beside `target` to build it in before `replace_dir` (same filesystem)."""
    check_write(target)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    return staging


def replace_dir(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the complete directory `staging` at `target`: readers see the old tree or the new one.

    A directory cannot be renamed over a non-empty one, so an existing `target` is first
    renamed aside (still whole) and removed only once the new one is in place.
    """
    check_write(target)
    staging, target = Path(staging), Path(target)
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)  # put the old tree back
        raise
    fsync_dir(target.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
