"""The compression work itself: teacher weights + training data → pruned / distilled students, gated.

Pure torch and Parquet, no registry and no Ray: the Ray task in _run.py calls `compress()` on a
node inside the teacher's regions, and unit tests call it directly.
"""

from __future__ import annotations

import time
from typing import Any

from mlplatform._internal import artifact_layout as layout
from mlplatform.errors import CompressError


def read_xy(path: str, metadata: dict[str, Any], field: str, max_rows: int | None = None):
    """(x float32 [N, F], y int64 [N]) from a Parquet file with the model's feature and label columns.

    Raises:
        CompressError: unreadable, or lacking the feature or label columns.
    """
    import numpy as np
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for missing or malformed files
        raise CompressError(f"Got {path!r} for `{field}`; cannot read it as Parquet ({e}).") from None
    label = layout.label_column(metadata)
    sig = metadata.get("input_signature") or {}
    cols = layout.feature_columns(sig.get("feature_columns"), table.column_names, label)
    missing = [c for c in [*cols, label] if c not in table.column_names]
    if missing:
        raise CompressError(
            f"{path} (`{field}`): lacks column(s) {missing[:5]} the teacher was trained on "
            f"(it has {table.column_names[:8]}). Pass a Parquet file with the training features and label."
        )
    if max_rows is not None:
        table = table.slice(0, max_rows)
    x = np.stack([np.asarray(table.column(c).to_numpy(), dtype=np.float32) for c in cols], axis=1)
    y = np.asarray(table.column(label).to_numpy()).astype(np.int64)
    return x, y


def check_teacher(metadata: dict[str, Any], where: str) -> None:
    """Compression supports classifiers with one flat float32 input; say so early otherwise.

    Raises:
        CompressError: another task, or an input that is not [-1, F] float32.
    """
    if metadata.get("task") != "classification":
        raise CompressError(
            f"{where}: metadata.json has {metadata.get('task')!r} for `task`; pruning and distillation gate on "
            f"classification accuracy and agreement, so they support classifiers only."
        )
    sig = metadata.get("input_signature") or {}
    shapes, dtypes = sig.get("shapes") or [], sig.get("dtypes") or []
    if len(shapes) != 1 or len(shapes[0]) != 2 or list(dtypes) != ["float32"]:
        raise CompressError(
            f"{where}: `input_signature` {sig!r} is not one float32 input of shape [-1, F]; the student MLP "
            f"needs flat features."
        )


def compress(metadata: dict[str, Any], weights: bytes, spec_json: dict[str, Any], train_path: str,
             holdout_path: str) -> list[dict[str, Any]]:
    """Prune and/or distill the teacher; each result gated against it on the held-out data.

    Returns one dict per method: method, model_kwargs, weights (safetensors bytes), params_before,
    params_after, params (the method's settings), gate (see _gate.judge), seconds.
    """
    import torch
    from safetensors.torch import load as load_weights
    from safetensors.torch import save as save_weights

    from mlplatform.compress import _distill, _gate, _prune
    from mlplatform.compress._spec import CompressSpec
    from mlplatform.train import models

    spec = CompressSpec.model_validate(spec_json)
    teacher = models.build(metadata["model_ref"], metadata.get("model_kwargs") or {})
    teacher.load_state_dict(load_weights(weights))
    teacher = teacher.float().eval()
    x, y = read_xy(train_path, metadata, "metadata.dataset.train")
    xv, yv = read_xy(holdout_path, metadata, "holdout_path", spec.max_holdout_rows)
    teacher_pred = _gate.predict(teacher, xv)
    before = _prune.count_params(teacher)
    results = []

    def finish(method: str, model, kwargs: dict[str, Any], params: dict[str, Any], started: float) -> None:
        gate = _gate.judge(teacher_pred, _gate.predict(model, xv), yv, spec.gate.max_accuracy_drop,
                           spec.gate.min_top1_agreement)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        results.append({
            "method": method, "model_kwargs": kwargs, "weights": save_weights(state), "params_before": before,
            "params_after": _prune.count_params(model), "params": params, "gate": gate,
            "seconds": round(time.perf_counter() - started, 3),
        })

    if spec.prune.enabled:
        if metadata["model_ref"] != "builtin:digits_mlp":
            raise CompressError(
                f"Got {metadata['model_ref']!r} for the teacher's model_ref; structured pruning supports "
                f"builtin:digits_mlp. Set `prune.enabled: false` and distill it instead."
            )
        t0 = time.perf_counter()
        p = spec.prune
        pruned, kwargs, _ = _prune.prune_mlp(teacher, metadata.get("model_kwargs") or {}, p.keep_ratio, p.norm)
        _distill.fit(pruned, x, y, epochs=p.epochs, lr=p.lr, batch_size=spec.batch_size, seed=spec.seed,
                     teacher=teacher if p.alpha else None, temperature=p.temperature, alpha=p.alpha)
        finish("prune", pruned, kwargs, {"keep_ratio": p.keep_ratio, "norm": p.norm, "epochs": p.epochs,
                                         "lr": p.lr, "alpha": p.alpha, "temperature": p.temperature}, t0)
    if spec.distill.enabled:
        t0 = time.perf_counter()
        d = spec.distill
        with torch.no_grad():
            classes = int(teacher(torch.from_numpy(x[:1])).shape[-1])
        student, kwargs = _distill.student({"in_features": int(x.shape[1]), "num_classes": classes}, d.hidden,
                                           spec.seed)
        _distill.fit(student, x, y, epochs=d.epochs, lr=d.lr, batch_size=spec.batch_size, seed=spec.seed,
                     teacher=teacher, temperature=d.temperature, alpha=d.alpha)
        finish("distill", student, kwargs, {"hidden": list(d.hidden), "temperature": d.temperature,
                                            "alpha": d.alpha, "epochs": d.epochs, "lr": d.lr}, t0)
    return results
