"""config.load: one error naming the file, each field path, its line, the value and what is allowed."""

import pytest
from pydantic import Field, ValidationError

from mlplatform import config
from mlplatform.cluster import ClusterSpec
from mlplatform.errors import SpecError


class Inner(config.Spec):
    size: int = Field(ge=1, description="A size.")


class Outer(config.Spec):
    name: str = Field(description="A name.")
    items: list[Inner] = Field(default_factory=list, description="Items.")


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads(tmp_path):
    spec = config.load(write(tmp_path, "name: a\nitems:\n  - size: 2\n"), Outer)
    assert spec.items[0].size == 2


def test_every_problem_is_listed_with_path_line_and_value(tmp_path):
    path = write(tmp_path, "name: a\nitems:\n  - size: 0\n  - size: 3\n    colour: red\nextra: 1\n")
    with pytest.raises(SpecError) as e:
        config.load(path, Outer)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 3 problems")
    assert "items[0].size (line 3): got 0; input should be greater than or equal to 1" in msg
    assert "items[1].colour (line 5): unknown field" in msg
    assert "extra (line 6): unknown field" in msg


def test_missing_field_named(tmp_path):
    with pytest.raises(SpecError, match=r"name: required field is missing"):
        config.load(write(tmp_path, "items: []\n"), Outer)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        config.load(tmp_path / "nope.yaml", Outer)


def test_invalid_yaml_names_line(tmp_path):
    with pytest.raises(SpecError, match=r"line 3, column 1: not valid YAML"):
        config.load(write(tmp_path, "name: a\nitems: [\n"), Outer)


def test_not_a_mapping(tmp_path):
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        config.load(write(tmp_path, "- a\n- b\n"), Outer)


def test_specs_are_frozen(tmp_path):
    spec = config.load(write(tmp_path, "name: a\n"), Outer)
    with pytest.raises(ValidationError, match=r"name\n  Instance is frozen"):
        spec.name = "b"
    assert spec.name == "a"


def test_cluster_spec_errors_all_at_once(tmp_path):
    path = write(
        tmp_path,
        "name: Bad_Name\nhead: {name: head, cpus: 1, memory_gb: 1, region: r, zone: z, market: spott}\n"
        "worker_groups:\n  - {name: w, cpus: -1, memory_gb: 1, region: r, zone: z, labels: {ray.io/x: y}}\n",
    )
    with pytest.raises(SpecError) as e:
        config.load(path, ClusterSpec)
    msg = str(e.value)
    for fragment in ["name (line 1)", "head.market (line 2): got 'spott'", "worker_groups[0].cpus", "ray.io/` prefix"]:
        assert fragment in msg, msg
