"""Every notebook runs top to bottom against the live cluster, and is committed without outputs."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def code_of(path):
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_are_stripped(path):
    for cell in code_of(path):
        assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: strip outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, three_region_cluster):
    # The cells run in order in one fresh interpreter, as a kernel would run them.
    source = "\n\n".join("".join(cell["source"]) for cell in code_of(path))
    result = subprocess.run(
        [sys.executable, "-c", source], cwd=REPO / "notebooks", capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
