"""Cluster spec rules and how a node group becomes a `ray start` command."""

import pytest

from mlplatform import config
from mlplatform.cluster import ClusterSpec, NodeGroup
from mlplatform.cluster.inventory import Node
from mlplatform.cluster.local import _LABEL_ENV, _node_command
from mlplatform.errors import SpecError

HEAD = {"name": "head", "cpus": 1, "memory_gb": 1, "region": "me-central-1", "zone": "me-central-1a"}


def spec(**overrides):
    data = {"name": "c", "head": HEAD, **overrides}
    return config.validate(data, ClusterSpec, "test")


def test_head_count_must_be_one():
    with pytest.raises(SpecError, match="head.count must be 1"):
        spec(head={**HEAD, "count": 2})


def test_group_names_unique():
    with pytest.raises(SpecError, match="repeated: head"):
        spec(worker_groups=[{**HEAD}])


def test_ports_must_differ_and_avoid_worker_range():
    with pytest.raises(SpecError, match="must differ"):
        spec(ports={"gcs": 7000, "dashboard": 7000, "client_server": 7001})
    with pytest.raises(SpecError, match="Ray reserves"):
        spec(ports={"client_server": 10005})


def test_reserved_resources_and_labels_rejected():
    with pytest.raises(SpecError, match="set by its own field"):
        spec(head={**HEAD, "resources": {"GPU": 1}})
    with pytest.raises(SpecError, match="reserves"):
        spec(head={**HEAD, "labels": {"ray.io/accelerator-type": "H100"}})


def test_node_labels_carry_ray_standard_keys():
    group = NodeGroup(**HEAD, market="spot", accelerator_type="H100", labels={"team": "ml"})
    assert group.node_labels() == {
        "ray.io/node-group": "head",
        "ray.io/availability-region": "me-central-1",
        "ray.io/availability-zone": "me-central-1a",
        "ray.io/market-type": "spot",
        "mlplatform.io/accelerator-type": "H100",
        "team": "ml",
    }


def test_node_command_passes_custom_labels_and_resources():
    group = NodeGroup(**{**HEAD, "cpus": 3, "memory_gb": 2, "resources": {"spot_slot": 1}, "labels": {"team": "ml"}})
    cmd = _node_command(group, "head", ["--head"])
    assert cmd[1:4] == ["start", "--block", "--head"]
    assert "--num-cpus=3" in cmd and f"--memory={2 * 2**30}" in cmd
    assert '--resources={"spot_slot": 1.0}' in cmd
    assert "--labels=team=ml" in cmd
    # Ray's own keys travel as RAY_NODE_* variables (as on KubeRay), never as --labels.
    assert not any(k in " ".join(cmd) for k in _LABEL_ENV)


def test_label_selector_matching():
    node = Node("id", "n", "ip", {"ray.io/market-type": "spot", "ray.io/availability-region": "me-central-1"}, {}, True, False)
    assert node.matches({"ray.io/market-type": "spot"})
    assert not node.matches({"ray.io/market-type": "!spot"})
    assert node.matches({"ray.io/availability-region": "in(me-central-1, me-west-1)"})
    assert not node.matches({"ray.io/availability-region": "!in(me-central-1)"})
    assert not node.matches({"ray.io/node-group": "gpu"})
