"""ServeSpec: presets with field overrides, the config error format, the Serve config file wrapper."""

import pytest

from conftest import REPO
from mlplatform import config
from mlplatform.errors import ModelNotDeployable, SpecError
from mlplatform.serve import PRESETS, Preset, ServeConfigFile, ServeSpec

BASE = {"name": "digits", "model": "digits@production", "registry_root": "/tmp/r"}


def test_preset_overridden_field_by_field():
    spec = ServeSpec(**BASE, primary={"autoscaling": {"preset": "throughput", "max_replicas": 2}})
    resolved = spec.primary.autoscaling.resolved()
    assert resolved == {**PRESETS[Preset.THROUGHPUT], "max_replicas": 2}


def test_every_problem_listed_in_the_config_format():
    with pytest.raises(SpecError) as e:
        config.validate({**BASE, "name": "Bad_Name", "model": "digits", "primary": {"variant": "tensorrt",
                         "batching": {"max_batch_size": 0}}, "extra": 1}, ServeSpec, "args")
    text = str(e.value)
    for where in ["name:", "model:", "primary.variant:", "primary.batching.max_batch_size:", "extra: unknown field"]:
        assert where in text, text


def test_request_rows_must_fit_a_batch():
    with pytest.raises(SpecError, match="limits.max_rows 64 exceeds primary.batching.max_batch_size 32"):
        config.validate({**BASE, "limits": {"max_rows": 64}}, ServeSpec, "args")


def test_autoscaling_bounds_checked_after_the_preset():
    with pytest.raises(SpecError, match="min_replicas 3 <= initial_replicas 1"):
        config.validate({**BASE, "primary": {"autoscaling": {"preset": "cost", "min_replicas": 3}}}, ServeSpec, "a")


def test_deployments_by_role():
    spec = ServeSpec(**BASE, fallback={}, canary={"model": "digits@canary", "percent": 5})
    assert list(spec.deployments()) == ["primary", "fallback", "canary"]
    assert list(ServeSpec(**BASE, fallback={"enabled": False}).deployments()) == ["primary"]


def test_colocate_needs_a_lone_primary_and_takes_its_settings():
    assert ServeSpec(**BASE, ingress={"colocate": True}).ingress.colocate
    with pytest.raises(SpecError, match="ingress.colocate needs a lone primary, but fallback and canary are set"):
        config.validate({**BASE, "ingress": {"colocate": True}, "fallback": {},
                         "canary": {"model": "digits@canary"}}, ServeSpec, "a")
    with pytest.raises(SpecError, match="but canary is set; remove it"):
        config.validate({**BASE, "ingress": {"colocate": True}, "canary": {"model": "digits@canary"}}, ServeSpec, "a")
    # A disabled fallback is no second deployment.
    ServeSpec(**BASE, ingress={"colocate": True}, fallback={"enabled": False})
    with pytest.raises(SpecError, match="ingress.num_cpus is set, but with ingress.colocate the primary's settings "
                                        "apply to the one deployment; set primary.num_cpus instead"):
        config.validate({**BASE, "ingress": {"colocate": True, "num_cpus": 0.5}}, ServeSpec, "a")


def test_config_file_app_name_must_match_args():
    app = {"name": "other", "import_path": "mlplatform.serve:build_app", "args": BASE}
    with pytest.raises(SpecError, match="differs from args.name"):
        config.validate({"applications": [app]}, ServeConfigFile, "f")


@pytest.mark.parametrize("name", ["digits-cpu", "digits-hybrid"])
def test_shipped_configs_point_at_the_demo_registry(name):
    spec = config.load(REPO / f"serve_apps/{name}.yaml", ServeConfigFile)
    args = spec.applications[0].args
    assert args.model == "digits@production" and args.registry_root == "/tmp/mlplatform/registry"


def test_build_app_validates_dict_args_with_the_config_format():
    from mlplatform.serve import build_app

    with pytest.raises(SpecError, match="(?s)serve application args: .*registry_root: required"):
        build_app({"name": "digits", "model": "digits@1"})


def test_variant_refused_when_its_export_gate_failed():
    from mlplatform.serve._models import check_variant

    report = {"variants": [{"variant": "onnx_int8", "file": "model.int8.onnx", "deployable": False},
                           {"variant": "onnx_fp32", "file": "model.onnx", "deployable": True}]}
    files = {"model.onnx": 1, "model.int8.onnx": 1}
    assert check_variant(files, report, "onnx_fp32", "d@1", "primary") == "model.onnx"
    with pytest.raises(ModelNotDeployable, match="NOT deployable"):
        check_variant(files, report, "onnx_int8", "d@1", "primary")
    with pytest.raises(ModelNotDeployable, match="no file 'model.int8.onnx'"):
        check_variant({"model.onnx": 1}, None, "onnx_int8", "d@1", "primary")
