"""`mlplatform registry ...`: the verbs a user drives the registry with."""

import json
import os

import pytest

from mlplatform import registry
from mlplatform.cli import main
from mlplatform.errors import RegistryError


# Every test runs on the embedded SQLite store and on a live PostgreSQL server.
pytestmark = pytest.mark.usefixtures("metadata_backend")

@pytest.fixture
def two_versions(tmp_path):
    root, art = tmp_path / "reg", tmp_path / "art"
    art.mkdir()
    for acc in (0.95, 0.97):
        (art / "model.safetensors").write_bytes(str(acc).encode() * 10)
        (art / "metadata.json").write_text(json.dumps({"metrics": {"accuracy": acc}}))
        registry.register(art, "digits", root=str(root))
    return str(root)


def cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_alias_promote_rollback_history(two_versions, capsys):
    r = ["--root", two_versions]
    assert cli(capsys, "registry", "alias", "digits", "production", "1", *r)[0] == 0
    assert cli(capsys, "registry", "alias", "digits", "canary", "2", *r)[0] == 0
    code, out, _ = cli(capsys, "registry", "promote", "digits", "--reason", "gate passed", *r)
    assert code == 0 and "production: version 1 -> version 2 (promote" in out
    code, out, _ = cli(capsys, "registry", "rollback", "digits", "production", *r)
    assert "production: version 2 -> version 1 (rollback" in out
    _, out, _ = cli(capsys, "registry", "history", "digits", "production", *r)
    assert [line.split()[2] for line in out.splitlines()[1:]] == ["set", "promote", "rollback"]
    assert "gate passed" in out
    _, out, _ = cli(capsys, "registry", "list", "digits", *r)
    assert "production" in out.splitlines()[1] and "accuracy=0.97" in out.splitlines()[2]


def test_diff_and_show(two_versions, capsys):
    _, out, _ = cli(capsys, "registry", "diff", "digits", "1", "2", "--root", two_versions)
    assert "metrics.accuracy" in out and "file model.safetensors" in out
    _, out, _ = cli(capsys, "registry", "show", "digits@2", "--root", two_versions)
    assert json.loads(out)["version"] == 2


def test_verify_flags_tampering_with_exit_1(two_versions, capsys, tmp_path):
    assert cli(capsys, "registry", "verify", "digits@1", "--root", two_versions)[0] == 0
    stored = next((tmp_path / "reg" / "digits" / "versions" / "1").rglob("model.safetensors"))
    stored.write_bytes(b"!" + stored.read_bytes()[1:])
    code, _, err = cli(capsys, "registry", "verify", "digits@1", "--root", two_versions)
    assert code == 1 and "TAMPERED  digits@1  model.safetensors" in err


def test_unknown_alias_is_one_clear_error(two_versions, capsys):
    code, _, err = cli(capsys, "registry", "show", "digits@nope", "--root", two_versions)
    assert code == 1 and err.startswith("error: ") and "no alias 'nope'" in err


def as_file_based(root: str) -> dict:
    """Turn a registry into the layout mlplatform wrote before the metadata store: each model's
    index in <root>/<name>/index.json (format 1), no database. Returns the indexes written."""
    from pathlib import Path

    from mlplatform.registry._index import DB_FILE, model_names, read_index
    from mlplatform.registry._store import Store

    store = Store(root)
    indexes = {name: read_index(store, name) for name in model_names(store)}
    for name, index in indexes.items():
        (Path(root) / name / "index.json").write_text(json.dumps({"format": 1, **index}, indent=1))
        (Path(root) / name / ".lock").write_text("pid 1 on host\n")  # the old index's flock target
    if "MLPLATFORM_METADATA_URL" in os.environ:  # a shared database: forget this root there
        import sqlalchemy as sa

        from mlplatform._internal.metadata import tables
        from mlplatform.registry._index import database, registry_key

        with database(store).begin() as conn:
            for table in (tables.registry_alias_moves, tables.registry_aliases, tables.registry_versions,
                          tables.registry_models):
                conn.execute(sa.delete(table).where(table.c.registry == registry_key(store)))
    else:
        for f in Path(root).glob(f"{DB_FILE}*"):
            f.unlink()
    return indexes


def test_a_file_based_registry_migrates_with_one_command(two_versions, capsys, tmp_path):
    r = ["--root", two_versions]
    registry.set_alias("digits", "production", 1, root=two_versions)
    registry.promote("digits", "production", "canary", root=two_versions)
    registry.set_alias("digits", "production", 2, root=two_versions, reason="better")
    before = (registry.list_versions("digits", root=two_versions), registry.alias_history("digits", root=two_versions))
    indexes = as_file_based(two_versions)
    assert len(indexes["digits"]["alias_history"]) == 3

    # Until migrated: reads and writes name the one command to run, and nothing is written.
    code, out, err = cli(capsys, "registry", "list", "digits", *r)
    assert code == 1 and "file-based format" in err and f"mlplatform registry migrate --root {two_versions}" in err
    art = tmp_path / "new"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"new")
    with pytest.raises(RegistryError, match="mlplatform registry migrate"):
        registry.register(art, "digits", root=two_versions)

    code, out, err = cli(capsys, "registry", "migrate", *r)
    assert code == 0 and "digits" in out and "imported" in out, err
    after = (registry.list_versions("digits", root=two_versions), registry.alias_history("digits", root=two_versions))
    assert after == before  # every version, alias move, actor, time and reason
    assert registry.list_aliases("digits", root=two_versions) == {"canary": 1, "production": 2}
    assert all(registry.verify(v.ref, root=two_versions).ok for v in after[0])
    assert registry.register(art, "digits", root=two_versions).version == 3
    # The old index is kept beside the model, renamed so that it is never read again.
    assert not os.path.exists(f"{two_versions}/digits/index.json")
    assert not os.path.exists(f"{two_versions}/digits/.lock")
    assert json.loads(open(f"{two_versions}/digits/index.json.migrated").read())["versions"] == indexes["digits"]["versions"]
    code, out, _ = cli(capsys, "registry", "migrate", *r)
    assert code == 0 and "nothing to migrate" in out
    assert len(registry.list_versions("digits", root=two_versions)) == 3


def test_a_damaged_file_index_imports_nothing(two_versions, capsys):
    as_file_based(two_versions)
    path = f"{two_versions}/digits/index.json"
    index = json.loads(open(path).read())
    index["aliases"]["production"] = 9  # names a version that is not listed
    open(path, "w").write(json.dumps(index))
    code, _, err = cli(capsys, "registry", "migrate", "--root", two_versions)
    assert code == 1 and "damaged" in err and "aliases {'production': 9}" in err
    assert os.path.exists(path)
    code, _, err = cli(capsys, "registry", "list", "digits", "--root", two_versions)
    assert "file-based format" in err
