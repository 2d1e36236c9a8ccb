"""`mlplatform registry ...`: the verbs a user drives the registry with."""

import json

import pytest

from mlplatform import registry
from mlplatform.cli import main


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
