"""The metadata store: what many processes on many nodes record concurrently, in one database.

SQLite is the embedded default (one machine, nothing to run); PostgreSQL is for shared clusters
(MLPLATFORM_METADATA_URL=postgresql://user:password@host:5432/dbname). Artifacts never go here; only
the facts about them (the registry's index, aliases and alias history; next the residency audit,
the cost ledger, keys and users).

Opening a store brings its schema to the newest migration (alembic) under a lock, so the first
process to use a new mlplatform version migrates and every other one waits for it. Writes that
read-modify-write go through `write_transaction`, which serialises them: SQLite takes its write
lock up front (BEGIN IMMEDIATE), PostgreSQL sets a lock timeout and callers lock rows FOR UPDATE.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlplatform.errors import PlatformError

URL_ENV = "MLPLATFORM_METADATA_URL"
LOCK_TIMEOUT_S = 60.0
MIGRATIONS = Path(__file__).with_name("migrations")
_PG_MIGRATION_LOCK = 0x6D6C_706C  # pg_advisory_lock key: "mlpl"
_engines: dict[tuple[int, str], Any] = {}


class MetadataStoreError(PlatformError):
    """The metadata database cannot be reached or used; the message names it (password hidden)."""


class MetadataBusy(MetadataStoreError):
    """A write waited longer than its timeout for another writer to finish."""


def configured_url() -> str | None:
    """The shared database named by MLPLATFORM_METADATA_URL, if any."""
    return os.environ.get(URL_ENV) or None


def sqlite_url(path: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(path).expanduser().absolute()}"


def open_store(url: str) -> Any:
    """An engine for `url` with its schema at the newest migration; one per process and URL."""
    key = (os.getpid(), url)  # a forked child must not reuse its parent's pooled connections
    fresh = key not in _engines
    if fresh:
        _engines[key] = _create_engine(url)
    engine = _engines[key]
    # A SQLite file can be deleted and created again under a running process (a registry root
    # removed and reused), so its schema is checked on every open: one cheap query.
    if fresh or not is_postgresql(engine):
        upgrade(engine)
    return engine


def describe(engine: Any) -> str:
    return engine.url.render_as_string(hide_password=True)


def is_postgresql(engine: Any) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def read_transaction(engine: Any) -> Iterator[Any]:
    """A consistent snapshot for several reads (SQLite: one deferred transaction)."""
    with _reporting(engine), engine.connect() as conn:
        yield conn


@contextmanager
def write_transaction(engine: Any, timeout_s: float | None = None) -> Iterator[Any]:
    """A transaction that commits on success and rolls back on any error.

    SQLite: the database write lock is taken at BEGIN, so a read-modify-write never races
    another writer. PostgreSQL: callers lock the rows they modify (SELECT ... FOR UPDATE);
    waiting for them longer than `timeout_s` (default LOCK_TIMEOUT_S) raises MetadataBusy.
    """
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    with _reporting(engine, timeout_s), engine.connect() as conn:
        if is_postgresql(engine):
            with conn.begin():
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'")
                yield conn
            return
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # we issue BEGIN ourselves
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.exec_driver_sql("ROLLBACK")
            raise
        conn.exec_driver_sql("COMMIT")


def upgrade(engine: Any) -> str:
    """Bring the schema to the newest migration (a no-op when it is there); returns that revision."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    config = _alembic_config()
    head = _head()

    def current() -> str | None:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    with _reporting(engine):
        if current() == head:
            return head
        if is_postgresql(engine):
            with engine.connect() as conn:
                # Session-level lock: every other process opening the store waits here.
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({_PG_MIGRATION_LOCK})")
                try:
                    if current() != head:  # another process may have migrated while we waited
                        with engine.begin() as migrating:
                            config.attributes["connection"] = migrating
                            command.upgrade(config, "head")
                finally:
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_PG_MIGRATION_LOCK})")
                    conn.commit()
        else:
            # SQLite DDL is transactional: one write transaction checks and migrates atomically.
            with write_transaction(engine) as conn:
                if MigrationContext.configure(conn).get_current_revision() != head:
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")
    return head


def _create_engine(url: str) -> Any:
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except Exception:
        raise MetadataStoreError(
            f"Got {url!r} for {URL_ENV}; it is not a database URL. Use "
            f"sqlite:////abs/path/metadata.db or postgresql://user:password@host:5432/dbname."
        ) from None
    if parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise MetadataStoreError(
                f"Got {url!r}; the metadata store must outlive the process: give a file, sqlite:////abs/path.db."
            )
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # No pool: every transaction opens the file afresh (cheap), so none holds a deleted file.
        engine = sa.create_engine(parsed, connect_args={"timeout": LOCK_TIMEOUT_S}, poolclass=sa.pool.NullPool)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() != "postgresql":
        raise MetadataStoreError(
            f"Got {parsed.render_as_string(hide_password=True)!r} for {URL_ENV}; the metadata store "
            f"runs on SQLite or PostgreSQL. Use postgresql://user:password@host:5432/dbname."
        )
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver mlplatform installs
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 10})


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@functools.cache
def _head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@contextmanager
def _reporting(engine: Any, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Database errors as one message naming the database and what to do."""
    import sqlalchemy as sa

    try:
        yield
    except sa.exc.OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        if getattr(e.orig, "sqlstate", None) == "55P03" or "database is locked" in reason:
            raise MetadataBusy(
                f"Waited {timeout_s:g} s for another writer of the metadata store {describe(engine)}; "
                f"retry when it finishes."
            ) from None
        raise MetadataStoreError(
            f"Cannot use the metadata store {describe(engine)}: {reason}. Check that the database is "
            f"running and reachable and that {URL_ENV} (or the registry root) is right."
        ) from None
