"""KubeRay manifests are rendered from the cluster specs and valid against the official CRD."""

import functools

import jsonschema
import pytest
import yaml

from conftest import REPO
from mlplatform import config
from mlplatform.cli import main
from mlplatform.cluster import ClusterSpec
from mlplatform import residency
from mlplatform.cluster.kuberay import render_raycluster

CRDS = REPO.parent / "shared" / "kuberay-crds"
SPECS = sorted((REPO / "cluster_configs" / "local").glob("*.yaml"))


def raycluster_schema():
    if not (CRDS / "ray.io_rayclusters.yaml").exists():
        pytest.skip(f"Requires: the KubeRay CRDs at {CRDS}")
    return _schema()


@functools.cache
def _schema():
    # The CRD is ~1 MB of YAML: parse it once, with libyaml.
    crd = yaml.load((CRDS / "ray.io_rayclusters.yaml").read_text(), Loader=yaml.CSafeLoader)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    # No metaschema check of the CRD itself (slow on a schema this size): it is upstream's.
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_manifest_is_the_render_of_its_spec(path, capsys):
    shipped = REPO / "cluster_configs" / "kuberay" / path.name
    assert main(["cluster", "render-kuberay", "--config", str(path.relative_to(REPO))]) == 0
    assert shipped.read_text() == capsys.readouterr().out, f"re-render {shipped.name} from {path.name}"


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_manifest_validates_against_the_crd(path):
    manifest = render_raycluster(config.load(path, ClusterSpec))
    assert [e.message for e in raycluster_schema().iter_errors(manifest)] == []


def test_groups_keep_their_place_labels_and_auth():
    path = REPO / "cluster_configs/local/three-region.yaml"
    spec = config.load(path, ClusterSpec)
    policy = residency.for_cluster_spec(spec, path)
    manifest = render_raycluster(spec, policy=policy)["spec"]
    assert manifest["authOptions"] == {"mode": "token"}
    eu = next(g for g in manifest["workerGroupSpecs"] if g["groupName"] == "eu")
    pod = eu["template"]["spec"]
    assert pod["nodeSelector"]["topology.kubernetes.io/region"] == "eu-central-1"
    env = {e["name"]: e.get("value") or e["valueFrom"] for e in pod["containers"][0]["env"]}
    assert env == {"RAY_NODE_REGION": "eu-central-1", "RAY_NODE_ZONE": "eu-central-1a", "RAY_NODE_TYPE_NAME": "eu", "RAY_NODE_MARKET_TYPE": "on-demand",
                   # the shared metadata store, from a Secret (no password in the manifest)
                   "MLPLATFORM_METADATA_URL": {"secretKeyRef": {"name": "mlplatform-metadata", "key": "url", "optional": True}},
                   # every Ray process on the pod works for this cluster, under its residency policy
                   "MLPLATFORM_CLUSTER": "three-region", "MLPLATFORM_RESIDENCY_POLICY": residency.encode(policy),
                   # and every worker process there starts under the residency guard
                   **residency.guard.node_env()}
    gpu = next(g for g in manifest["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["labels"] == {"mlplatform.io/simulated-gpu": "true"}


def test_invalid_manifest_is_caught_by_the_schema():
    manifest = render_raycluster(config.load(SPECS[0], ClusterSpec))
    manifest["spec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError, match="'password' is not one of"):
        raycluster_schema().validate(manifest)
