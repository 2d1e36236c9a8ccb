"""The local autoscaling config is rendered from the cluster spec; bad bounds are refused by name."""

import pytest
import yaml

from conftest import REPO
from mlplatform import config
from mlplatform.cluster import ClusterSpec
from mlplatform.cluster.autoscaler import FAKE_HEAD_NODE_TYPE, bounds, render_fake_provider_config
from mlplatform.errors import SpecError

SPEC = REPO / "cluster_configs/local/autoscaling.yaml"


def test_every_worker_group_is_a_node_type_with_its_labels_and_bounds():
    spec = config.load(SPEC, ClusterSpec)
    rendered = render_fake_provider_config(spec, "10.0.0.1:6390")
    types = rendered["available_node_types"]
    assert set(types) == {FAKE_HEAD_NODE_TYPE, "cpu", "gpu", "gpu-ondemand"}
    gpu = types["gpu"]
    # Ray's standard labels too: launched nodes would otherwise inherit the head's region and market.
    assert gpu["labels"] == {
        "ray.io/node-group": "gpu", "ray.io/availability-region": "me-central-1",
        "ray.io/availability-zone": "me-central-1b", "ray.io/market-type": "spot",
        "mlplatform.io/simulated-gpu": "true",
    }
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 2)
    assert gpu["resources"]["CPU"] == 2 and "memory" not in gpu["resources"]
    assert types["cpu"]["min_workers"] == 1
    assert rendered["max_workers"] == 5
    assert rendered["idle_timeout_minutes"] == pytest.approx(0.5)
    assert rendered["provider"]["gcs_address"] == "10.0.0.1:6390"


def test_a_fixed_group_beside_autoscaled_ones_keeps_its_count():
    body = yaml.safe_load(SPEC.read_text())
    body["worker_groups"][0].pop("autoscaling")
    body["worker_groups"][0]["count"] = 2
    spec = ClusterSpec.model_validate(body)
    assert bounds(spec.worker_groups[0]) == (2, 2)
    assert spec.autoscaled()


def _load(tmp_path, body):
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(body))
    return config.load(path, ClusterSpec)


def test_bounds_that_cannot_hold_min_workers_are_refused(tmp_path):
    body = yaml.safe_load(SPEC.read_text())
    body["worker_groups"][1]["autoscaling"] = {"min_workers": 3, "max_workers": 2}
    with pytest.raises(SpecError) as e:
        _load(tmp_path, body)
    message = str(e.value)
    assert "worker_groups[1].autoscaling" in message and "min_workers (3) exceeds max_workers (2)" in message


def test_the_head_cannot_autoscale(tmp_path):
    body = yaml.safe_load(SPEC.read_text())
    body["head"]["autoscaling"] = {"max_workers": 2}
    with pytest.raises(SpecError, match="head.autoscaling is not allowed"):
        _load(tmp_path, body)


def test_max_workers_is_required_and_positive(tmp_path):
    body = yaml.safe_load(SPEC.read_text())
    body["worker_groups"][1]["autoscaling"] = {"min_workers": 0, "max_workers": 0}
    with pytest.raises(SpecError, match="max_workers"):
        _load(tmp_path, body)
