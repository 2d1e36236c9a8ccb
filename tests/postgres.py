"""A real PostgreSQL server for the tests: Debian's package, started from a fresh data directory.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` user the package ships (with its data directory owned by that user).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def bin_dir() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `apt-get install postgresql` (make test does it).")
    return os.path.dirname(found[-1])


@contextmanager
def server(port: int) -> Iterator[str]:
    """A running server on 127.0.0.1:`port` with an empty database; yields its SQLAlchemy URL."""
    data = tempfile.mkdtemp(prefix="mlplatform-pg-")
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(data, "postgres", "postgres")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*cmd: str) -> None:
        subprocess.run(prefix + list(cmd), check=True, capture_output=True, cwd="/tmp")

    tools = bin_dir()
    run(f"{tools}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    # fsync off: a test server never outlives a crash; the socket lives in the data directory.
    run(f"{tools}/pg_ctl", "-D", data, "-w", "-l", f"{data}/server.log", "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        run(f"{tools}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlplatform")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/mlplatform"
    finally:
        run(f"{tools}/pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)
