"""TrainSpec validation and the offline preflight checks: every bad input named with its fix."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlplatform import config
from mlplatform.errors import PlatformError, PreflightError, SpecError
from mlplatform.train import TrainSpec, preflight
from mlplatform.train.preflight import check_capacity, check_dataset, check_model, check_storage

GOOD = """
name: digits-test
model: {ref: "builtin:digits_mlp"}
dataset: {path: "builtin:digits"}
task: classification
epochs: 2
global_batch_size: 64
micro_batch_size: 16
num_workers: 2
zero_stage: 2
precision: bf16
"""


def parse(extra: str = "", **replace: str) -> TrainSpec:
    text = GOOD
    for key, value in replace.items():
        text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line for line in text.splitlines()) + "\n"
    return config.parse(text + textwrap.dedent(extra), TrainSpec, source="t.yaml")


def problem(extra: str = "", **replace: str) -> str:
    with pytest.raises(SpecError) as e:
        parse(extra, **replace)
    return str(e.value)


def test_good_spec_and_derived_values():
    spec = parse()
    assert spec.accum_steps == 2 and spec.cpus_per_worker == 1.0
    assert spec.placement.selector() == {}


def test_unknown_field_is_named():
    assert "zero_stagee" in problem("zero_stagee: 2\n")


@pytest.mark.parametrize("stage", ["5", "-1", "four"])
def test_bad_zero_stage(stage):
    msg = problem(zero_stage=stage)
    assert "zero_stage" in msg and "auto" in msg


def test_batch_not_divisible_names_fields_and_a_fix():
    msg = problem(global_batch_size="100")
    assert "global_batch_size (line" in msg
    assert "16 × 2 × 1 = 32" in msg and "e.g. 96" in msg


def test_batch_not_divisible_with_accumulation():
    msg = problem("grad_accum_steps: 3\n")
    assert "global_batch_size" in msg and "16 × 2 × 3 = 96" in msg


def test_accumulation_that_disagrees_with_global_batch():
    msg = problem("grad_accum_steps: 1\n")
    assert "grad_accum_steps" in msg and "set it to 2" in msg


def test_no_length_given():
    assert "`epochs` or `max_steps`" in problem(epochs="null")


@pytest.mark.parametrize(
    "extra,field,fix",
    [
        ("offload_params: true\n", "offload_params", "zero_stage: 3"),
        ("offload_optimizer: true\n", "offload_optimizer", "use_gpu: false"),
        ("use_gpu: true\noffload_optimizer: true\nprecision_x: 1\n", "precision_x", "unknown field"),
        ("accelerator_type: A100\n", "accelerator_type", "use_gpu: true"),
        ("activation_checkpointing: true\n", "activation_checkpointing", "set it to false"),
    ],
)
def test_stage_and_option_combinations_deepspeed_rejects(extra, field, fix):
    msg = problem(extra)
    assert field in msg and fix in msg


def test_offload_optimizer_needs_stage_1_or_more_on_gpu():
    msg = problem("use_gpu: true\noffload_optimizer: true\n", zero_stage="0", precision="fp16")
    assert "offload_optimizer" in msg and "zero_stage 1, 2 or 3" in msg


def test_fp16_on_cpu_is_refused():
    msg = problem(precision="fp16")
    assert "precision (line" in msg and "use bf16 or fp32" in msg


def test_fp16_with_offload_on_gpu_is_fine():
    spec = parse("use_gpu: true\noffload_optimizer: true\noffload_params: true\n", zero_stage="3", precision="fp16")
    assert spec.offload_params


def test_model_task_mismatch():
    assert "use task: causal_lm" in problem(model='{ref: "builtin:gpt"}')
    assert "builtin:gpt for task causal_lm" in problem(task="causal_lm")


@pytest.mark.parametrize("ref", ["builtin:resnet", "not a path", "pkg.mod", ":f"])
def test_malformed_model_ref(ref):
    assert "model.ref" in problem(model=f'{{ref: "{ref}"}}')


def test_unknown_builtin_dataset():
    assert "dataset.path" in problem(dataset='{path: "builtin:mnist"}')


def test_spot_contradiction_and_spot_exclusion():
    msg = problem("placement: {allow_spot: false, label_selector: {ray.io/market-type: spot}}\n")
    assert "placement.label_selector" in msg and "allow_spot" in msg
    spec = parse("placement: {allow_spot: false, label_selector: {ray.io/node-group: cpu}}\n")
    assert spec.placement.selector() == {"ray.io/node-group": "cpu", "ray.io/market-type": "!spot"}


def test_every_problem_listed_at_once():
    msg = problem(global_batch_size="100", precision="fp16")
    assert "2 problems" in msg and "global_batch_size" in msg and "precision" in msg


# ------------------------------------------------------------ offline preflight checks


def test_unknown_model_import_path():
    with pytest.raises(SpecError, match="model.ref.*cannot be imported"):
        check_model(parse(model='{ref: "no_such_pkg.models:build"}'))
    with pytest.raises(SpecError, match="no callable `nope`"):
        check_model(parse(model='{ref: "json:nope"}'))


def test_model_factory_rejecting_kwargs():
    with pytest.raises(SpecError, match="model.kwargs"):
        check_model(parse(model='{ref: "builtin:digits_mlp", kwargs: {widht: 3}}'))


def test_imported_factory_must_return_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def good(width=8):\n    return torch.nn.Linear(64, width)\n"
        "def bad():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    check_model(parse(model='{ref: "my_models:good", kwargs: {width: 10}}'))
    with pytest.raises(SpecError, match="not a torch.nn.Module"):
        check_model(parse(model='{ref: "my_models:bad"}'))
    sys.modules.pop("my_models", None)


def _table(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def test_dataset_missing(tmp_path):
    with pytest.raises(PreflightError, match="dataset.path.*does not exist"):
        check_dataset(parse(dataset=f"{{path: {tmp_path / 'nope.parquet'}}}"))


def test_dataset_without_label_column(tmp_path):
    f = _table(tmp_path / "d.parquet", x=[1.0, 2.0], target=[0, 1])
    with pytest.raises(PreflightError, match="no label column `label`.*x, target.*dataset.label_column"):
        check_dataset(parse(dataset=f"{{path: {f}}}"))
    check_dataset(parse(dataset=f"{{path: {f}, label_column: target}}"))


def test_dataset_with_missing_or_non_numeric_features(tmp_path):
    f = _table(tmp_path / "d.parquet", x=[1.0, 2.0], name=["a", "b"], label=[0, 1])
    with pytest.raises(PreflightError, match="feature columns name are not numeric.*dataset.feature_columns"):
        check_dataset(parse(dataset=f"{{path: {f}}}"))
    check_dataset(parse(dataset=f"{{path: {f}, feature_columns: [x]}}"))
    with pytest.raises(PreflightError, match="feature_columns.*`y`"):
        check_dataset(parse(dataset=f"{{path: {f}, feature_columns: [x, y]}}"))


def test_lm_dataset_without_text_column(tmp_path):
    f = _table(tmp_path / "d.parquet", body=["hello"])
    lm = 'task: causal_lm\n'
    with pytest.raises(PreflightError, match="text_column"):
        check_dataset(parse(model='{ref: "builtin:gpt"}', task="causal_lm", dataset=f"{{path: {f}}}"))
    del lm


def test_empty_dataset_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="no Parquet files"):
        check_dataset(parse(dataset=f"{{path: {tmp_path / 'empty'}}}"))


def test_unwritable_storage_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PreflightError, match="storage_path"):
        check_storage(parse(f"storage_path: {blocker / 'runs'}\n"))
    check_storage(parse(f"storage_path: {tmp_path / 'runs'}\n"))
    assert not list((tmp_path / "runs").rglob("*probe*"))  # nothing left behind


def test_preflight_without_a_cluster_runs_the_offline_checks(tmp_path):
    spec = parse(f"storage_path: {tmp_path}\n")
    preflight(spec, cluster=False)


def test_errors_pickle_across_processes():
    for err in (PreflightError("x"), SpecError("y")):
        back = pickle.loads(pickle.dumps(err))
        assert isinstance(back, PlatformError) and str(back) == str(err)


def _nodes():
    from mlplatform.cluster.inventory import from_ray_nodes

    def node(i, group, cpus, market="on-demand", gpus=0, alive=True):
        labels = {"ray.io/node-group": group, "ray.io/market-type": market}
        resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
        return {"NodeID": f"n{i}", "NodeName": f"10.0.0.{i}", "NodeManagerAddress": f"10.0.0.{i}",
                "Labels": labels, "Resources": resources, "Alive": alive}

    return from_ray_nodes([node(0, "head", 1), node(1, "cpu", 4), node(2, "gpu", 2, "spot"), node(3, "cpu", 4, alive=False)])


def test_capacity_fits_on_matching_alive_nodes():
    spec = parse("placement: {label_selector: {ray.io/node-group: cpu}, allow_spot: false}\n")
    check_capacity(spec, _nodes())


def test_more_workers_than_the_selected_nodes_can_ever_hold():
    spec = parse(
        "placement: {label_selector: {ray.io/node-group: cpu}}\nresources_per_worker: {CPU: 3}\n"
    )
    with pytest.raises(PreflightError, match="`num_workers`.*at most 1 workers.*Lower `num_workers` to 1"):
        check_capacity(spec, _nodes())  # the dead second cpu node does not count


def test_selector_no_node_satisfies():
    spec = parse("placement: {label_selector: {ray.io/node-group: gpu}, allow_spot: false}\n")
    with pytest.raises(PreflightError, match="placement.label_selector.*no alive node matches.*allow_spot: true"):
        check_capacity(spec, _nodes())


def test_gpu_workers_need_gpu_nodes():
    spec = parse("use_gpu: true\n", precision="fp16")
    with pytest.raises(PreflightError, match="at most 0 workers"):
        check_capacity(spec, _nodes())
