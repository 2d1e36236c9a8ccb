"""The Ray VM launcher config is rendered from the cloud spec, valid against Ray's own schema,
and the shipped one equals its render."""

import functools
import importlib.util
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import REPO
from mlplatform import config
from mlplatform.cli import main
from mlplatform.cluster import ClusterSpec
from mlplatform.cluster.launcher import render_launcher
from mlplatform.cluster.render import rendered_by
from mlplatform.errors import SpecError

SHIPPED = sorted((REPO / "cluster_configs" / "launcher").glob("*.yaml"))
CLOUD = REPO / "cluster_configs/cloud/uae.yaml"


@functools.cache
def ray_schema():
    # Found without importing Ray (unit tests stay fast).
    wheel = Path(importlib.util.find_spec("ray").origin).parent
    return jsonschema.Draft7Validator(json.loads((wheel / "autoscaler/ray-schema.json").read_text()))


def cloud_spec(**changes):
    data = yaml.safe_load(CLOUD.read_text())
    for group, fields in changes.items():
        target = data["head"] if group == "head" else next(g for g in data["worker_groups"] if g["name"] == group)
        target.update(fields)
        for key in [k for k, v in fields.items() if v is None]:
            del target[key]
    return config.validate(data, ClusterSpec, "test")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_launcher_is_the_render_its_header_names(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(rendered_by(path)) == 0
    assert path.read_text() == capsys.readouterr().out, f"{path.name} drifted: re-render it with its first line"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_launcher_validates_against_ray_schema(path):
    assert SHIPPED, "cluster_configs/launcher/ holds no launcher config"
    assert [e.message for e in ray_schema().iter_errors(yaml.safe_load(path.read_text()))] == []


def test_groups_become_node_types():
    launcher = render_launcher(config.load(CLOUD, ClusterSpec))
    assert launcher["provider"] == {"type": "aws", "region": "me-central-1",
                                    "availability_zone": "me-central-1a,me-central-1b", "cache_stopped_nodes": False}
    assert launcher["head_node_type"] == "head"
    types = launcher["available_node_types"]
    spot = types["gpu-a10g"]
    assert spot["node_config"]["InstanceType"] == "g5.xlarge"
    assert spot["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"}
    assert "InstanceMarketOptions" not in types["gpu-a10g-ondemand"]["node_config"]
    assert spot["resources"] == {"CPU": 4, "memory": 11 * 2**30, "GPU": 1}
    assert spot["labels"]["ray.io/market-type"] == "spot"
    assert spot["labels"]["mlplatform.io/accelerator-type"] == "A10G"
    assert (spot["min_workers"], spot["max_workers"]) == (0, 4)
    assert (types["head"]["min_workers"], types["head"]["max_workers"]) == (0, 0)
    assert launcher["max_workers"] == 4 + 4 + 2
    assert launcher["idle_timeout_minutes"] == 5


def test_nodes_start_with_token_auth_and_the_residency_policy():
    from mlplatform import residency

    spec = config.load(CLOUD, ClusterSpec)
    policy = residency.for_cluster_spec(spec, CLOUD)
    launcher = render_launcher(spec, policy, token_file="/secrets/token")
    assert launcher["file_mounts"]["~/mlplatform/auth_token"] == "/secrets/token"
    for command in (launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]):
        words = shlex.split(command)
        assert "RAY_AUTH_MODE=token" in words and "RAY_AUTH_TOKEN_PATH=~/mlplatform/auth_token" in words
        assert f"MLPLATFORM_RESIDENCY_POLICY={residency.encode(policy)}" in words
        assert all(f"{k}={v}" in words for k, v in residency.guard.node_env().items())
        assert "--metrics-export-port=8080" in words


def test_fixed_groups_have_count_as_both_bounds():
    launcher = render_launcher(cloud_spec(cpu={"autoscaling": None, "count": 3}))
    cpu = launcher["available_node_types"]["cpu"]
    assert (cpu["min_workers"], cpu["max_workers"]) == (3, 3)


@pytest.mark.parametrize("changes,message", [
    ({"gpu-a10g": {"instance_type": None}},
     r"Got no `worker_groups\[1\]\.instance_type` \(group 'gpu-a10g'\); the launcher needs an instance type for every "
     r"group .* Set e\.g\. `instance_type: g5\.xlarge`"),
    ({"head": {"instance_type": None}}, r"Got no `head\.instance_type`"),
    ({"cpu": {"region": "eu-central-1", "zone": "eu-central-1a"}},
     r"Got 'eu-central-1' for `worker_groups\[0\]\.region` \(group 'cpu'\); one launcher config drives one provider region"),
    ({"cpu": {"resources": {"slot": 0.5}}}, r"Got 0\.5 for `worker_groups\[0\]\.resources\.slot`"),
])
def test_specs_the_launcher_cannot_express_are_refused(changes, message):
    with pytest.raises(SpecError, match=message):
        render_launcher(cloud_spec(**changes))


def test_local_specs_name_the_missing_instance_type(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["cluster", "render", "--target", "launcher", "--config", "cluster_configs/local/dev.yaml"]) != 0
    assert "Got no `head.instance_type`" in capsys.readouterr().err
