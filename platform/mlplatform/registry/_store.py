"""The registry's artifact storage: paths, reads and writes on a pyarrow filesystem.

Layout under the root:
    registry.db                            the index (SQLite) unless MLPLATFORM_METADATA_URL names a database
    <name>/.staging/<token>/               a registration in progress, invisible to readers
    <name>/versions/<N>/manifest.json      sha256 + size of every file, lineage, encryption header
    <name>/versions/<N>/files/<relpath>    the artifact's files (ciphertext when encrypted)

A version is visible only once the index (see _index.py) lists it, and the index is written
last, in one transaction, so a crash at any point leaves either the old state or the new one.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, BinaryIO

from mlplatform._internal import storage
from mlplatform.errors import RegistryError, RegistryNotWritable

ROOT_ENV = "MLPLATFORM_REGISTRY_ROOT"
_log = logging.getLogger(__name__)
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


class Store:
    """One registry root on one pyarrow filesystem."""

    def __init__(self, root: str | os.PathLike[str] | None) -> None:
        import pyarrow.fs as pafs

        if root is None:
            root = os.environ.get(ROOT_ENV)
            if not root:
                raise RegistryError(
                    f"No registry root given. Pass `root` (a local path or a URI such as "
                    f"s3://bucket/registry) or set {ROOT_ENV}."
                )
        text = storage.absolute(root)
        self.fs, self.root = storage.filesystem(text, "root", RegistryError)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        scheme = text.split("://", 1)[0] if storage.is_uri(text) else ""
        self._prefix = "" if self.local or not scheme else f"{scheme}://"
        self.display = self.uri(self.root)

    # --- paths ---

    def path(self, *parts: str | int) -> str:
        return "/".join([self.root.rstrip("/"), *(str(p) for p in parts)])

    def uri(self, path: str) -> str:
        return self._prefix + path

    def version_dir(self, name: str, number: int) -> str:
        return self.path(name, "versions", number)

    def files_dir(self, name: str, number: int) -> str:
        return self.path(name, "versions", number, "files")

    # --- reads ---

    def exists(self, path: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def open_input(self, path: str) -> Any:
        return self.fs.open_input_stream(path)

    def list_files(self, directory: str) -> dict[str, int] | None:
        """{relative path: size} of every file below `directory`; None if it is missing."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        except FileNotFoundError:
            return None
        base = directory.rstrip("/") + "/"
        return {
            i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File
        }

    def list_dirs(self, directory: str) -> list[str]:
        """Names of the immediate subdirectories of `directory` ([] if it is missing)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(directory, allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return [i.base_name for i in infos if i.type == pafs.FileType.Directory]

    # --- writes ---

    def ensure_writable(self, name: str | None = None) -> None:
        """Create the root if needed and prove a file can be written there, else raise.

        With `name`, the probe goes where registering that model writes first (its staging
        area): a writable root does not make a model's own directory writable.
        """
        where = self.path(name, ".staging") if name else self.root
        probe = f"{where}/.write-probe-{uuid.uuid4().hex}"
        storage.check_write(self.uri(probe))  # even the empty probe is a write
        try:
            self.fs.create_dir(where, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"")
            self.fs.delete_file(probe)
        except OSError as e:
            for_model = f" for model {name!r} ({self.uri(where)})" if name else ""
            raise RegistryNotWritable(
                f"Registry root {self.display} (`root`) is not writable{for_model}: {_reason(e)}. Nothing "
                f"was written. Pass a `root` you can write to, or fix its permissions."
            ) from None

    @contextmanager
    def open_output(self, path: str) -> Iterator[BinaryIO]:
        """A new file at `path` (parents created); on local disks it is fsynced on close."""
        with ExitStack() as files:
            # Only opening is wrapped: an OSError raised by the caller's block (say, reading
            # the source) must not be reported as this file being unwritable.
            with self._writing(path):
                if self.local:
                    f = files.enter_context(storage.open_output(path))
                else:
                    storage.check_write(self.uri(path))
                    self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
                    f = files.enter_context(self.fs.open_output_stream(path))
            yield f

    def move(self, src: str, dst: str) -> None:
        storage.check_write(self.uri(dst))
        with self._writing(dst):
            self.fs.create_dir(dst.rsplit("/", 1)[0], recursive=True)
            self.fs.move(src, dst)  # rename on local disks: atomic

    def delete_quietly(self, path: str) -> None:
        """Best-effort removal of a directory tree, for cleanup after a failure."""
        try:
            self.fs.delete_dir(path)
        except OSError:
            _log.warning("could not remove %s; it is not visible in the registry", self.uri(path))

    @contextmanager
    def _writing(self, path: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if isinstance(e, PermissionError) or getattr(e, "errno", None) in _NOT_WRITABLE:
                raise RegistryNotWritable(
                    f"Cannot write {self.uri(path)} in registry {self.display} (`root`): "
                    f"{_reason(e)}. Fix its permissions or pass another `root`."
                ) from None
            raise


def staging_token() -> str:
    return uuid.uuid4().hex


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
