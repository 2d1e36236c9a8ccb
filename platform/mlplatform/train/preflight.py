"""Checks made before any worker starts: model, data, storage and cluster capacity.

Each failure names the spec field and the fix. Ray leaves work whose label selector
no node satisfies pending forever, so capacity is checked here against the live nodes.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mlplatform._internal import placement, storage
from mlplatform.errors import PreflightError, ResidencyError, SpecError
from mlplatform.residency import REGION_LABEL
from mlplatform.train import models
from mlplatform.train.spec import Task, TrainSpec

if TYPE_CHECKING:
    from mlplatform.cluster import Node
    from mlplatform.residency import ResidencyPolicy


def preflight(spec: TrainSpec, cluster: bool = True, policy: ResidencyPolicy | None = None) -> dict[str, str]:
    """Run every check; with `cluster`, also the live-cluster capacity check (needs ray.init).

    Returns the label selector the workers get: the spec's own, narrowed by the residency
    `policy` (the cluster's) to the regions the spec's classification allows.

    Raises:
        SpecError: the model reference or its kwargs are wrong.
        PreflightError: data, storage or capacity problems.
        ResidencyError: the classification is unknown, the selector contradicts the policy, or no
            node where the policy allows the work can hold it.
    """
    selector = placement_selector(spec, policy)
    if policy is not None:  # checkpoints and the artifact go under storage_path: refused before a byte is written
        policy.check_storage(spec.classification, spec.storage_path, "storage_path")
    check_model(spec)
    check_dataset(spec)
    check_storage(spec)
    if cluster:
        import ray

        from mlplatform.cluster.inventory import from_ray_nodes

        check_capacity(spec, from_ray_nodes(ray.nodes()), selector, policy)
    return selector


def placement_selector(spec: TrainSpec, policy: ResidencyPolicy | None) -> dict[str, str]:
    """The workers' label selector under `policy`; a classification needs a policy to mean anything."""
    if policy is None:
        if spec.classification:
            raise ResidencyError(
                f"Got {spec.classification!r} for `classification`, but this cluster has no residency policy, "
                "so nothing would keep the work where that data must stay. Run it on a cluster whose spec "
                "names a `residency_policy`, or remove `classification`."
            )
        return spec.placement.selector()
    return policy.place(spec.classification, spec.placement.selector(), "placement.label_selector")


def check_model(spec: TrainSpec) -> None:
    """The model reference imports and its factory accepts the kwargs (built on the meta device)."""
    import torch

    with torch.device("meta"):
        models.build(spec.model.ref, spec.model.kwargs, spec.activation_checkpointing)


def check_dataset(spec: TrainSpec) -> None:
    """Paths exist, hold Parquet files, and have the columns the task needs."""
    ds = spec.dataset
    if ds.path.startswith("builtin:"):
        return
    for field, path in (("dataset.path", ds.path), ("dataset.validation_path", ds.validation_path)):
        if path is None:
            continue
        schema = _parquet_schema(field, path)
        names = list(schema.names)
        if spec.task == Task.CAUSAL_LM:
            if ds.text_column not in names:
                raise PreflightError(
                    f"Got {path!r} for `{field}`; it has no text column `{ds.text_column}` (columns: "
                    f"{', '.join(names)}). Set `dataset.text_column` to one of them."
                )
            continue
        if ds.label_column not in names:
            raise PreflightError(
                f"Got {path!r} for `{field}`; it has no label column `{ds.label_column}` (columns: "
                f"{', '.join(names)}). Set `dataset.label_column` to the target column."
            )
        features = ds.feature_columns or [n for n in names if n != ds.label_column]
        missing = [c for c in features if c not in names]
        if missing:
            raise PreflightError(
                f"Got {ds.feature_columns} for `dataset.feature_columns`; `{'`, `'.join(missing)}` not in {path} "
                f"(columns: {', '.join(names)}). Drop them or fix the spelling."
            )
        non_numeric = [c for c in features if not _numeric(schema.field(c).type)]
        if non_numeric:
            raise PreflightError(
                f"Got {path!r} for `{field}`; feature columns {', '.join(non_numeric)} are not numeric. "
                "Encode them as numbers or list only numeric columns in `dataset.feature_columns`."
            )
        if not features:
            raise PreflightError(
                f"Got {path!r} for `{field}`; it has no feature columns besides the label. Add inputs."
            )


def check_storage(spec: TrainSpec) -> None:
    """The storage path can be created and written (a probe file is written and removed)."""
    fs, root = storage.filesystem(spec.storage_path, "storage_path", PreflightError)
    probe = f"{root.rstrip('/')}/{spec.name}/.mlplatform-probe-{uuid.uuid4().hex}"
    try:
        fs.create_dir(f"{root.rstrip('/')}/{spec.name}", recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        raise PreflightError(
            f"Got {spec.storage_path!r} for `storage_path`; it cannot be written ({e}). Point it at a writable "
            "directory (shared by all nodes: NFS, S3) or fix its permissions."
        ) from None


def check_capacity(spec: TrainSpec, nodes: Sequence[Node], selector: dict[str, str] | None = None,
                   policy: ResidencyPolicy | None = None) -> None:
    """The cluster's alive nodes matching the selector can ever hold num_workers workers."""
    selector = spec.placement.selector() if selector is None else selector
    need = {k: v for k, v in spec.resources_per_worker.items() if v > 0}
    if spec.use_gpu:
        need.setdefault("GPU", 1.0)
    need.setdefault("CPU", 1.0)
    room = placement.capacity(nodes, selector, need)
    if room.total >= spec.num_workers:
        return
    fit, matching = room.total, room.matching
    where = f"nodes matching {selector}" if selector else "the cluster's nodes"
    confined = ""
    if policy is not None:
        if placement.capacity(nodes, spec.placement.selector(), need).total >= spec.num_workers:
            # The spec alone would fit: the policy is what keeps the work from running.
            _refuse_outside_residency(spec, nodes, selector, need, policy, fit)
        confined = " " + _residency_context(spec, nodes, policy)
    if not matching:
        groups = sorted({f"{n.group or '?'} ({dict(n.labels)})" for n in nodes if n.alive})
        raise PreflightError(
            f"Got {selector} for `placement.label_selector`; no alive node matches it, so the workers would wait "
            f"forever. Nodes: {'; '.join(groups) or 'none'}. Fix the selector"
            + (" or set `placement.allow_spot: true`" if not spec.placement.allow_spot else "")
            + "." + confined
        )
    raise PreflightError(
        f"Got {spec.num_workers} for `num_workers`; {where} can hold at most {fit:g} workers of "
        f"{need} each (nodes: {', '.join(f'{n.name} {dict(n.resources)}' for n in matching)}). "
        f"Lower `num_workers` to {fit:g}, lower `resources_per_worker`, or widen `placement.label_selector`." + confined
    )


def _refuse_outside_residency(spec: TrainSpec, nodes: Sequence[Node], selector: dict[str, str],
                              need: dict[str, float], policy: ResidencyPolicy, fit: float) -> None:
    """Work that fits the cluster but not where the policy lets it run: say so in residency's terms."""
    missing = (f"no node matches {selector}" if not placement.capacity(nodes, selector, need).matching
               else f"those nodes hold at most {fit:g} of the {spec.num_workers} workers of {need} each")
    raise ResidencyError(
        f"{spec.name}: the workers need {selector} and {missing}. {_residency_context(spec, nodes, policy)} "
        f"Point `placement.label_selector` at a group inside the allowed regions, lower `num_workers` or "
        f"`resources_per_worker`, or add capacity there. Nothing was started."
    )


def _residency_context(spec: TrainSpec, nodes: Sequence[Node], policy: ResidencyPolicy) -> str:
    """The classification, where it may run, and which node groups are there and elsewhere."""
    name = policy.resolve(spec.classification)
    inside = sorted({n.group or "?" for n in nodes if n.alive and placement.matches(n.labels, policy.selector(name))})
    present = sorted({f"{n.group or '?'} ({n.labels.get(REGION_LABEL, '?')})" for n in nodes if n.alive})
    return (f"Classification {name!r} may only run in {policy.where(name)} (residency policy {policy.name!r}); "
            f"node groups present: {'; '.join(present)}; inside the allowed regions: {', '.join(inside) or 'none'}.")


def pa_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    return (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError)


def _parquet_schema(field: str, path: str):
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(path, field, PreflightError)
    try:
        info = fs.get_file_info(inner)
    except pa_errors() as e:
        raise PreflightError(f"Got {path!r} for `{field}`; it cannot be read ({e}). Check the path and access.") from None
    if info.type == pafs.FileType.NotFound:
        raise PreflightError(
            f"Got {path!r} for `{field}`; it does not exist. Check the path, or use builtin:digits / builtin:tiny_corpus."
        )
    try:
        dataset = pads.dataset(inner, format="parquet", filesystem=fs)
        if not dataset.files:
            raise PreflightError(f"Got {path!r} for `{field}`; the directory has no Parquet files. Point it at them.")
        return dataset.schema
    except pa_errors() as e:
        raise PreflightError(f"Got {path!r} for `{field}`; not readable as Parquet ({e}).") from None


def _numeric(t) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t) or pat.is_decimal(t)


__all__ = ["SpecError", "check_capacity", "check_dataset", "check_model", "check_storage", "preflight"]
