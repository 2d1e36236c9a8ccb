"""The metadata store on its own: schema migrations under concurrency, busy writers, bad URLs."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from conftest import run_together

from mlplatform._internal import metadata

OPENERS = 6


def _open(url: str, barrier) -> None:
    barrier.wait()  # every process finds an empty database and tries to migrate it at once
    metadata.open_store(url)


def fresh_url(backend: str, tmp_path, postgres_url: str | None) -> str:
    if backend == "sqlite":
        return metadata.sqlite_url(tmp_path / "meta" / "metadata.db")
    name = f"t{tmp_path.name[-20:].lower().replace('-', '_')}"
    with sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    pg = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return fresh_url(request.param, tmp_path, pg)


def test_processes_opening_a_new_database_at_once_migrate_it_once(url):
    run_together(_open, [(url,) for _ in range(OPENERS)])
    engine = metadata.open_store(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [metadata._head()]
    assert {"registry_models", "registry_versions", "registry_aliases", "registry_alias_moves"} <= set(
        sa.inspect(engine).get_table_names())


def test_a_writer_waiting_past_its_timeout_is_told_so(url):
    engine = metadata.open_store(url)
    with metadata.write_transaction(engine) as conn:
        conn.execute(sa.text("INSERT INTO registry_models VALUES ('r', 'm', 'now')"))
    with metadata.write_transaction(engine) as holder:
        holder.execute(sa.text("UPDATE registry_models SET created_at = 'later'"))  # row-locks it
        error: list[BaseException] = []

        def second_writer() -> None:
            try:
                with metadata.write_transaction(engine, timeout_s=0.5) as conn:
                    conn.execute(sa.text("DELETE FROM registry_models"))
            except BaseException as e:  # noqa: BLE001 - asserted below
                error.append(e)

        t = threading.Thread(target=second_writer)
        t.start()
        t.join(30)
    assert len(error) == 1 and isinstance(error[0], metadata.MetadataBusy), error
    assert "Waited 0.5 s for another writer of the metadata store" in str(error[0])
    with engine.connect() as conn:  # the holder's write committed; the second changed nothing
        assert conn.execute(sa.text("SELECT created_at FROM registry_models")).scalars().all() == ["later"]


def test_a_failed_write_transaction_leaves_nothing(url):
    engine = metadata.open_store(url)
    with pytest.raises(RuntimeError):
        with metadata.write_transaction(engine) as conn:
            conn.execute(sa.text("INSERT INTO registry_models VALUES ('r', 'm', 'now')"))
            raise RuntimeError("the caller's change failed")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM registry_models")).scalar() == 0


@pytest.mark.parametrize("url, match", [
    ("not a url", "it is not a database URL"),
    ("mysql://u:secret@h/db", "runs on SQLite or PostgreSQL"),
    ("sqlite://", "must outlive the process"),
    ("sqlite:///:memory:", "must outlive the process"),
])
def test_bad_urls_are_refused_clearly(url, match):
    with pytest.raises(metadata.MetadataStoreError, match=match) as info:
        metadata.open_store(url)
    assert "secret" not in str(info.value)


def test_an_unreachable_server_is_named_without_its_password():
    from conftest import free_port

    url = f"postgresql://mlp:hunter2@127.0.0.1:{free_port()}/meta"
    with pytest.raises(metadata.MetadataStoreError, match=r"Cannot use the metadata store postgresql\+psycopg://mlp:\*\*\*@127") as info:
        metadata.open_store(url)
    assert "hunter2" not in str(info.value) and "running and reachable" in str(info.value)
