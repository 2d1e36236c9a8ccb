"""The final artifact: what the model registry takes as is, and the loader that rebuilds the model.

An artifact directory holds WEIGHTS (consolidated fp32 weights, every parameter and buffer),
METADATA (model_ref, model_kwargs, spec, metrics, dataset_fingerprint, input_signature,
output_signature, created_at, ray_job_id, classification, training_regions, training_node_ids,
...) and SAMPLE (the first training inputs, the drift reference); mlplatform._internal.artifact_layout
names them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlplatform._internal import storage
from mlplatform._internal.artifact_layout import METADATA, SAMPLE, WEIGHTS
from mlplatform.errors import TrainArtifactError as ArtifactError


def load_model(artifact_dir: str | os.PathLike):
    """The trained `nn.Module` (fp32, eval mode) rebuilt from an artifact directory.

    Raises:
        ArtifactError: the directory lacks metadata.json or model.safetensors, or they disagree.
    """
    meta = read_metadata(artifact_dir)
    weights = Path(artifact_dir) / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{artifact_dir}: no {WEIGHTS}; the training run did not finish writing its artifact.")
    return build_with_weights(meta["model_ref"], meta.get("model_kwargs") or {}, weights)


def build_with_weights(ref: str, kwargs: dict[str, Any], weights: str | os.PathLike):
    """Build the model a reference names and load a safetensors file into it (fp32, eval mode)."""
    from safetensors.torch import load_model as load_weights

    from mlplatform.train import models

    model = models.build(ref, kwargs)
    try:
        load_weights(model, str(weights))
    except RuntimeError as e:
        raise ArtifactError(f"{weights}: does not fit {ref} with its kwargs ({e}).") from None
    return model.float().eval()


def read_metadata(artifact_dir: str | os.PathLike) -> dict[str, Any]:
    """metadata.json of an artifact directory."""
    path = Path(artifact_dir) / METADATA
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; is {artifact_dir} a training artifact directory?") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable ({e}).") from None


def write_artifact(target: str, weights_file: str, metadata: dict[str, Any], sample_table,
                   residency: Mapping[str, Any] | None = None) -> str:
    """Write the artifact directory at `target` atomically (a complete directory or none).

    Args:
        residency: {"classification": str | None, "regions": [...], "node_ids": [...]}: the
            data's classification, resolved under the cluster's policy, and the regions and
            Ray node ids the training ran on. Recorded in metadata.json as `classification`,
            `training_regions` and `training_node_ids`, which the registry carries into every
            version made from this artifact. None: the spec's classification, places unknown.
    """
    import pyarrow.parquet as pq

    residency = dict(residency or {})
    unknown = sorted(set(residency) - {"classification", "regions", "node_ids"})
    if unknown:
        raise ArtifactError(f"Got unknown key(s) {unknown} in `residency`; use classification, regions, node_ids.")
    spec = metadata.get("spec") or {}
    meta = {
        **metadata,
        "classification": residency.get("classification") or spec.get("classification"),
        "training_regions": sorted(set(residency.get("regions") or [])),
        "training_node_ids": sorted(set(residency.get("node_ids") or [])),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    target_path = Path(target)
    tmp = storage.staging_dir(target_path)
    try:
        storage.copy_file(weights_file, tmp / WEIGHTS)
        storage.check_write(tmp / SAMPLE)  # pyarrow writes the file itself
        pq.write_table(sample_table, tmp / SAMPLE)
        storage.atomic_write(tmp / METADATA, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        storage.replace_dir(tmp, target_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target_path)


def evaluate(model, x, y, task: str) -> dict[str, float]:
    """Held-out metrics of an fp32 model on numpy inputs (the numbers metadata.json reports)."""
    import math

    import torch

    model.eval()
    total, loss_sum, metric_sum = 0, 0.0, 0.0
    with torch.no_grad():
        for i in range(0, len(x), 256):
            xb, yb = torch.from_numpy(x[i : i + 256]), torch.from_numpy(y[i : i + 256])
            out = model(xb).float()
            if task == "classification":
                metric_sum += (out.argmax(-1) == yb).sum().item()
                loss_sum += torch.nn.functional.cross_entropy(out, yb, reduction="sum").item()
                total += len(yb)
            elif task == "regression":
                se = ((out.squeeze(-1) - yb) ** 2).sum().item()
                metric_sum += se
                loss_sum += se
                total += len(yb)
            else:
                loss_sum += torch.nn.functional.cross_entropy(
                    out.reshape(-1, out.shape[-1]), yb.reshape(-1), reduction="sum"
                ).item()
                total += yb.numel()
    total = max(total, 1)
    if task == "classification":
        return {"val_accuracy": metric_sum / total, "val_loss": loss_sum / total}
    if task == "regression":
        return {"val_rmse": math.sqrt(metric_sum / total), "val_loss": loss_sum / total}
    return {"val_loss": loss_sum / total, "val_perplexity": math.exp(min(loss_sum / total, 50))}
