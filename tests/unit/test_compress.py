"""Pruning, distillation and the compression gate, without Ray (mlplatform.compress internals)."""

import json

import numpy as np
import pytest

from mlplatform.errors import CompressError, SpecError


def _mlp(hidden, seed=0):
    import torch

    from mlplatform.train import models

    torch.manual_seed(seed)
    return models.build("builtin:digits_mlp", {"hidden": hidden}).eval()


def test_prune_removes_neurons_physically_and_keeps_the_survivors_weights():
    import torch

    from mlplatform.compress import _prune

    teacher = _mlp([16, 8])
    small, kwargs, kept = _prune.prune_mlp(teacher, {"hidden": [16, 8]}, keep_ratio=0.5, norm=2)
    assert kwargs["hidden"] == [8, 4] and [len(k) for k in kept] == [8, 4]
    old = [m for m in teacher if isinstance(m, torch.nn.Linear)]
    new = [m for m in small if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in new] == [(8, 64), (4, 8), (10, 4)]
    # The kept neurons are those with the largest L2 norms of their weight rows.
    norms = old[0].weight.detach().norm(dim=1)
    assert sorted(kept[0]) == sorted(torch.topk(norms, 8).indices.tolist())
    # Surviving rows and columns are the teacher's, bit for bit (before any fine-tuning).
    assert torch.equal(new[0].weight, old[0].weight[kept[0]])
    assert torch.equal(new[0].bias, old[0].bias[kept[0]])
    assert torch.equal(new[1].weight, old[1].weight[kept[1]][:, kept[0]])
    assert torch.equal(new[2].weight, old[2].weight[:, kept[1]])
    assert torch.equal(new[2].bias, old[2].bias)
    assert _prune.count_params(small) < _prune.count_params(teacher) / 2
    # Same function as the teacher with the removed neurons silenced: the cut is structurally right.
    masked = _mlp([16, 8])
    masked.load_state_dict(teacher.state_dict())
    lin = [m for m in masked if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for layer, keep in zip(lin, kept):
            drop = [i for i in range(layer.out_features) if i not in keep]
            layer.weight[drop] = 0
            layer.bias[drop] = 0
    x = torch.rand(32, 64)
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-6)


def test_prune_l1_and_keep_all():
    from mlplatform.compress import _prune

    teacher = _mlp([10])
    small, kwargs, kept = _prune.prune_mlp(teacher, {"hidden": [10]}, keep_ratio=1.0, norm=1)
    assert kwargs["hidden"] == [10] and kept == [list(range(10))]
    _, kwargs, _ = _prune.prune_mlp(teacher, {"hidden": [10]}, keep_ratio=0.01, norm=1)
    assert kwargs["hidden"] == [1]  # at least one neuron survives


def test_prune_refuses_a_model_it_cannot_cut_safely():
    from torch import nn

    from mlplatform.compress import _prune

    with pytest.raises(CompressError, match="nn.Sequential of Linear/ReLU/Dropout.*distill"):
        _prune.linear_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)), "m@1")


def test_gate_names_the_shortfall():
    from mlplatform.compress import _gate

    y = np.array([0] * 90 + [1] * 10)
    teacher = y.copy()
    ok = _gate.judge(teacher, teacher, y, 0.01, 0.97)
    assert ok["passed"] and ok["top1_agreement"] == 1.0 and ok["accuracy_drop"] == 0.0 and ok["failures"] == []
    worse = teacher.copy()
    worse[:2] = 1  # two rows wrong: 2 points less accurate, 98% agreement
    bad = _gate.judge(teacher, worse, y, 0.01, 0.99)
    assert not bad["passed"]
    assert any("2.00 points below the teacher's 1.0000 (allowed: 1.00)" in f for f in bad["failures"]), bad
    assert any("agreement with the teacher 0.9800 is below 0.9900" in f for f in bad["failures"]), bad
    assert _gate.judge(teacher, worse, y, 0.02, 0.98)["passed"]


def test_spec_needs_one_method_and_validates_widths():
    from mlplatform import config
    from mlplatform.compress import CompressSpec

    with pytest.raises(SpecError, match="enable at least one"):
        config.validate({"prune": {"enabled": False}, "distill": {"enabled": False}}, CompressSpec, "spec")
    with pytest.raises(SpecError, match="hidden"):
        config.validate({"distill": {"hidden": [0]}}, CompressSpec, "spec")


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """sklearn digits as Parquet (train/validation) and a [64]-wide MLP teacher trained on it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save
    from sklearn.datasets import load_digits

    from mlplatform.compress import _distill

    d = tmp_path_factory.mktemp("digits")
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))  # the file's tail is another writer's digits
    x, y = (data.data[order] / 16.0).astype(np.float32), data.target[order].astype(np.int64)
    paths = {}
    for split, rows in (("train", slice(0, 1400)), ("validation", slice(1400, None))):
        cols = {f"pixel_{i}": x[rows, i] for i in range(64)} | {"label": y[rows]}
        paths[split] = str(d / f"{split}.parquet")
        pq.write_table(pa.table(cols), paths[split])
    teacher = _mlp([64])
    torch.set_num_threads(1)
    _distill.fit(teacher, x[:1400], y[:1400], epochs=15, lr=0.01, batch_size=128, seed=0)
    meta = {"model_ref": "builtin:digits_mlp", "model_kwargs": {"hidden": [64]}, "task": "classification",
            "input_signature": {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, 64]],
                                "feature_columns": [f"pixel_{i}" for i in range(64)]}}
    return meta, save({k: v.contiguous() for k, v in teacher.state_dict().items()}), paths


def test_compress_prunes_and_distills_within_the_gate(digits_teacher):
    from safetensors.torch import load

    from mlplatform.compress import CompressSpec, _work
    from mlplatform.train import models

    meta, weights, paths = digits_teacher
    spec = CompressSpec.model_validate({"prune": {"keep_ratio": 0.25, "epochs": 3},
                                        "distill": {"hidden": [16], "epochs": 15}, "batch_size": 128,
                                        # Few epochs to stay fast: a looser gate than the shipped 1 point / 0.97.
                                        "gate": {"max_accuracy_drop": 0.03, "min_top1_agreement": 0.93}})
    results = {r["method"]: r for r in _work.compress(meta, weights, spec.model_dump(mode="json"),
                                                       paths["train"], paths["validation"])}
    assert set(results) == {"prune", "distill"}
    pruned, distilled = results["prune"], results["distill"]
    assert pruned["model_kwargs"]["hidden"] == [16] and distilled["model_kwargs"]["hidden"] == [16]
    assert pruned["params_after"] < pruned["params_before"] / 3
    for r in results.values():
        assert r["gate"]["passed"], (r["method"], r["gate"])
        assert r["gate"]["rows"] == 397
        # The weights come back loadable into the kwargs they claim (what the registry's load_model does).
        model = models.build("builtin:digits_mlp", r["model_kwargs"])
        model.load_state_dict(load(r["weights"]))
        assert json.dumps(r["gate"])  # lineage-serialisable
    # A gate the student cannot meet fails with the shortfall named.
    strict = spec.model_copy(update={"gate": spec.gate.model_copy(update={"min_top1_agreement": 1.0}),
                                     "prune": spec.prune.model_copy(update={"enabled": False})})
    out = _work.compress(meta, weights, strict.model_dump(mode="json"), paths["train"], paths["validation"])
    assert not out[0]["gate"]["passed"] and "agreement" in out[0]["gate"]["failures"][0]


def test_compress_refuses_a_regressor_and_missing_columns(digits_teacher, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mlplatform.compress import CompressSpec, _work

    meta, weights, paths = digits_teacher
    with pytest.raises(CompressError, match="classifiers only"):
        _work.check_teacher({**meta, "task": "regression"}, "m@1")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"pixel_0": [0.1], "label": [1]}), bad)
    with pytest.raises(CompressError, match=r"lacks column\(s\) \['pixel_1'"):
        _work.compress(meta, weights, CompressSpec().model_dump(mode="json"), str(bad), paths["validation"])


def test_report_names_what_was_registered_and_the_shortfall_of_what_was_not():
    from mlplatform.compress import CompressReport, CompressResult, _gate, format_report

    y = np.array([0] * 95 + [1] * 5)
    ok, bad = _gate.judge(y, y, y, 0.01, 0.97), _gate.judge(y, np.zeros(100, int), y, 0.01, 0.97)
    report = CompressReport("digits@1", "me-central-1", "n1", (
        CompressResult("prune", "digits-pruned", "digits-pruned@1", 19210, 4810, {"keep_ratio": 0.25}, ok, 1.0),
        CompressResult("distill", "digits-distilled", None, 19210, 2410, {"hidden": [32]}, bad, 1.0),
    ))
    text = format_report(report)
    assert not report.ok
    assert "prune    params 19210 -> 4810 (4.0x smaller)" in text and "gate PASSED" in text
    assert "registered digits-pruned@1" in text
    assert "gate FAILED: accuracy 0.9500 is 5.00 points below the teacher's 1.0000 (allowed: 1.00)" in text
    assert "not registered (set `register_failed: true` to register it anyway)" in text
