"""What a new user trips over first: their own model module, and spec files outside the shipped folders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from mlplatform import spec_kinds
from mlplatform.cli import main
from mlplatform.errors import SpecError

MLPLATFORM = Path(sys.executable).parent / "mlplatform"  # the console script, as a user runs it

MYMOD = """\
import torch


def make_model(hidden: int = 16):
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
"""


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A folder holding mymod.py and spec.yaml (the shipped digits spec with `model: {ref: mymod:make_model}`)."""
    (tmp_path / "mymod.py").write_text(MYMOD)
    spec = yaml.safe_load((REPO / "jobs/configs/digits.yaml").read_text())
    spec["model"] = {"ref": "mymod:make_model", "kwargs": {"hidden": 16}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(MLPLATFORM), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_train_plan_imports_the_model_module_from_the_current_directory(user_folder):
    result = _run("train", "plan", "--config", "spec.yaml", cwd=user_folder)
    assert result.returncode == 0, result.stderr
    assert "mymod:make_model" in result.stdout and "1,210 parameters" in result.stdout


def test_a_missing_model_module_is_still_a_clear_error(user_folder):
    (user_folder / "mymod.py").unlink()
    result = _run("train", "plan", "--config", "spec.yaml", cwd=user_folder)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "module `mymod` cannot be imported" in result.stderr


# --- validate: the kind from the file's keys --------------------------------------


@pytest.mark.parametrize("shipped,kind", [
    ("cluster_configs/local/three-region.yaml", "cluster"),
    ("cluster_configs/residency/uae.yaml", "residency"),
    ("cluster_configs/prices/example.yaml", "prices"),
    ("jobs/configs/digits.yaml", "train"),
    ("jobs/configs/export-digits.yaml", "export"),
    ("serve_apps/digits-cpu.yaml", "serve"),
])
def test_kind_is_inferred_from_the_keys_of_each_shipped_kind(shipped, kind, tmp_path, capsys):
    copy = tmp_path / "f.yaml"  # where it sits says nothing now
    copy.write_text((REPO / shipped).read_text())
    assert spec_kinds.kind_of(str(copy)) is None
    assert spec_kinds.kind_from_content(str(copy)) == kind
    if kind in ("cluster", "serve"):  # their relative references (policy, catalog) resolve from the shipped folder only
        return
    assert main(["validate", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"ok  {copy} ({kind}, inferred from its keys)"


def test_tune_kind_is_inferred(tmp_path, capsys):
    # A TuneSpec names its TrainSpec relative to itself: keep the pair together.
    (tmp_path / "digits.yaml").write_text((REPO / "jobs/configs/digits.yaml").read_text())
    tune = tmp_path / "search.yaml"
    tune.write_text((REPO / "jobs/configs/tune-digits.yaml").read_text())
    assert main(["validate", str(tune)]) == 0
    assert "(tune, inferred from its keys)" in capsys.readouterr().out


def test_the_shipped_folders_still_decide_first(capsys):
    assert main(["validate", str(REPO / "jobs/configs/digits.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith("(train)")


def test_an_inferred_spec_with_errors_says_which_kind_it_was_checked_as(tmp_path, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: x\nhead: {name: head}\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "ClusterSpec" in err and "checked as a cluster spec, inferred from its keys" in err


@pytest.mark.parametrize("text,says", [
    ("model: {ref: a:b}\nsearch_space: {}\n", "fit more than one kind of spec: train (model); tune (search_space)"),
    ("a: 1\nname: x\n", "from its keys (a, name: none belongs to one kind only)"),
    ("- 1\n", "holds a YAML list, not a mapping"),
    ("", "holds an empty file"),
    ("a: [\n", "not valid YAML"),
])
def test_unknown_or_ambiguous_content_is_one_clear_error(text, says, tmp_path, capsys):
    stray = tmp_path / "x.yaml"
    stray.write_text(text)
    with pytest.raises(SpecError, match="pass --kind") as e:
        spec_kinds.kind_from_content(str(stray))
    assert says in str(e.value)
    assert main(["validate", str(stray)]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--kind (cluster, residency, prices, train, export, compress, tune, serve)" in err


def test_every_file_is_reported_even_when_one_cannot_be_told(tmp_path, capsys):
    stray = tmp_path / "x.yaml"
    stray.write_text("a: 1\n")
    assert main(["validate", str(stray), str(REPO / "jobs/configs/digits.yaml")]) == 1
    assert "ok  " in capsys.readouterr().out


def test_an_unknown_kind_flag_lists_the_kinds(capsys):
    assert main(["validate", "--kind", "bogus", str(REPO / "jobs/configs/digits.yaml")]) == 1
    assert "Got 'bogus' for `--kind`; must be one of cluster, residency" in capsys.readouterr().err


def test_every_kind_has_distinctive_keys():
    # A kind whose every key another kind shares could never be inferred.
    assert all(spec_kinds.distinctive_keys().values())
