"""The package layout the product card fixes, and the stdlib module it must not shadow."""

import subprocess
import sys

from conftest import REPO


def test_platform_dir_is_not_a_package():
    # A package importable as `platform` would shadow the stdlib module Ray, torch and pytest use.
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_is_the_real_one_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, mlplatform; print(platform.python_version(), mlplatform.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    assert out.startswith(sys.version.split()[0])
    assert "platform/mlplatform/__init__.py" in out


def test_top_level_layout():
    for name in ["pyproject.toml", "platform", "jobs", "serve_apps", "cluster_configs", "tests", "notebooks", "README.md", "Makefile", ".ci/run", "BENCHMARKS.md"]:
        assert (REPO / name).exists(), name
