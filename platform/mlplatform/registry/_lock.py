"""An exclusive lock on a local lock file, held around each index read-modify-write.

fcntl.flock is released by the kernel when the holder exits or crashes, so a dead
process can never leave a stale lock behind; no pid/age heuristics are needed.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mlplatform.errors import RegistryLockTimeout

DEFAULT_TIMEOUT_S = 60.0


@contextmanager
def exclusive_lock(path: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the duration of the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RegistryLockTimeout(
                        f"Waited {timeout_s:.0f} s for the registry lock {path}, held by "
                        f"{_holder(path)}. Another registration or alias change is still "
                        f"running; retry when it finishes."
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        # Who holds it, for the timeout message above; informational only.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "an unknown process"
    except OSError:
        return "an unknown process"
