"""The CLI: fast help without heavy imports, one-line errors, a traceback only with --debug."""

import subprocess
import sys

import pytest

from conftest import REPO
from mlplatform.cli import COMMANDS, main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mlplatform", *args], cwd=REPO, capture_output=True, text=True, env=env)


def test_help_everywhere_imports_neither_ray_nor_torch():
    helps = [[], *[[p[0]] for p in COMMANDS], *[list(p) for p in COMMANDS]]
    code = (
        "import sys\nfrom mlplatform.cli import main\n"
        f"for argv in {helps!r}:\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit as e:\n        assert e.code == 0, argv\n"
        "heavy = [m for m in ('ray', 'torch', 'deepspeed', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_validate_shipped_configs_without_importing_ray():
    code = (
        "import sys\nfrom mlplatform.cli import main\n"
        "assert main(['validate', 'cluster_configs/local/dev.yaml', 'cluster_configs/local/three-region.yaml']) == 0\n"
        "assert 'ray' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_invalid_spec_exits_nonzero_listing_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nhead: {name: head, cpus: -1, memory_gb: 0, region: r, zone: z}\nbogus: 1\n")
    result = run_cli("validate", "--kind", "cluster", str(bad))
    assert result.returncode == 1
    assert "3 problems" in result.stderr and "Traceback" not in result.stderr


def test_failure_is_one_line_without_traceback(tmp_path):
    env = {**__import__("os").environ, "MLPLATFORM_HOME": str(tmp_path)}
    result = run_cli("cluster", "down", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("error: No local cluster is running.")
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback(tmp_path):
    env = {**__import__("os").environ, "MLPLATFORM_HOME": str(tmp_path)}
    result = run_cli("--debug", "cluster", "down", "--name", "ghost", env=env)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ClusterNotRunning" in result.stderr


def test_unknown_kind_of_path_is_explained(tmp_path, capsys):
    stray = tmp_path / "x.yaml"
    stray.write_text("a: 1\n")
    assert main(["validate", str(stray)]) == 1
    assert "pass --kind" in capsys.readouterr().err


def test_unknown_verb_is_a_usage_error():
    result = run_cli("cluster", "explode")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_command_has_help(path):
    assert COMMANDS[path].help
