"""compress_model(): registered teacher → Ray task in its regions → gated students → registry versions."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlplatform._internal import artifact_layout as layout
from mlplatform._internal import storage
from mlplatform.compress._spec import CompressSpec
from mlplatform.errors import CompressError

TASK_NAME = "mlplatform.compress"  # what `ray list tasks` and the residency sweep show
_KIND = {"prune": "pruned", "distill": "distilled"}  # method → model-name suffix and export's student kind


@dataclass(frozen=True)
class CompressResult:
    """One compressed model: how it was made, its gate, and the version registered (None: not registered)."""

    method: str
    name: str
    version_ref: str | None
    params_before: int
    params_after: int
    params: dict[str, Any]
    gate: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class CompressReport:
    teacher_ref: str
    region: str | None
    node_id: str | None
    results: tuple[CompressResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.gate["passed"] for r in self.results)


def format_report(report: CompressReport) -> str:
    """A few lines per result: gate figures, pass/fail (with the shortfall), what was registered."""
    lines = [f"teacher {report.teacher_ref}  ran in {report.region or '(local)'}"]
    for r in report.results:
        g = r.gate
        verdict = "PASSED" if g["passed"] else "FAILED: " + "; ".join(g["failures"])
        lines.append(
            f"{r.method:<8} params {r.params_before} -> {r.params_after} ({r.params_before / r.params_after:.1f}x "
            f"smaller)  accuracy {g['accuracy']:.4f} (teacher {g['teacher_accuracy']:.4f})  agreement "
            f"{g['top1_agreement']:.4f}  gate {verdict}"
        )
        lines.append(f"         registered {r.version_ref}" if r.version_ref else
                     "         not registered (set `register_failed: true` to register it anyway)")
    return "\n".join(lines)


def compress_model(ref: str, spec: CompressSpec | None = None, *, root: str | os.PathLike | None = None,
                   key: Any = None, actor: str | None = None) -> CompressReport:
    """Prune and/or distill a registered classifier in a Ray task inside its data's regions; register
    each result that passes its gate as `<teacher>-pruned` / `<teacher>-distilled` (or the spec's names).

    Lineage of each new version: the teacher's classification (inherited) and input signature, and
    extra = {"compressed_from": teacher pinned ref, "compression": {"method", "kind", params...,
    "params_before", "params_after", "gate"}}.

    Raises:
        CompressError (unsupported teacher, data unreadable, no node to run on); ResidencyError;
        registry errors (ModelNotFound, RegistryNotWritable, ...). Nothing is registered on any of them.
    """
    import ray

    from mlplatform import access, registry, residency
    from mlplatform.errors import ResidencyError
    from mlplatform.residency import guard

    spec = spec or CompressSpec()
    parent = registry.resolve(ref, root=root)
    names = {m: _name(spec, parent.name, m) for m in _methods(spec)}
    for name in names.values():
        access.require("registry.register", f"registry:{name}")
    policy = residency.current()
    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            # ray.init() would start a private one-node Ray here: no residency policy, no regions.
            raise CompressError(
                "Compression runs as Ray work on the cluster; this process is neither in a Ray job nor connected. "
                "Submit jobs/compress.py with `ray job submit`, or run `eval \"$(mlplatform cluster env)\"` first."
            )
        ray.init(logging_level="WARNING")  # the job's cluster (`ray job submit` sets RAY_ADDRESS)
    try:
        classification = residency.inherit(policy, parent.lineage.classification, None, field="classification",
                                           source=f"the teacher {parent.ref}")
        selector = dict(spec.label_selector)
        if policy is not None:
            # The driver decrypts the teacher; the task reads its training data: both inside its regions.
            guard.check_driver(policy, classification)
            selector = policy.place(classification, selector, "label_selector")
        _check_some_node(selector)
    except ResidencyError as e:
        residency.record("denial", what="compress", model=parent.name, source=parent.ref, reason=str(e))
        raise
    job_id = ray.get_runtime_context().get_job_id()
    if policy is not None:
        guard.declare(policy.resolve(classification))
        residency.record("placement", what="compress", name=parent.ref, job_id=job_id, policy=policy.name,
                         classification=policy.resolve(classification), selector=selector)
    with residency.confined(policy, classification):
        for name in names.values():
            registry.check_writable(root, name)  # before the work, not after it
        work = storage.temp_dir("mlplatform-compress-")
        try:
            return _run(parent, spec, names, selector, classification, work, root, key, actor)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _run(parent, spec: CompressSpec, names: dict[str, str], selector: dict[str, str], classification: str | None,
         work: Path, root: Any, key: Any, actor: str | None) -> CompressReport:
    import ray

    from mlplatform import registry, residency
    from mlplatform.compress import _work
    from mlplatform.train import read_metadata

    src = work / "teacher"
    registry.fetch(parent.ref, src, root=root, key=key)  # the pinned version: an alias may move meanwhile
    meta = read_metadata(src)
    if not meta.get("input_signature") and parent.lineage.input_signature:
        meta["input_signature"] = parent.lineage.input_signature
    _work.check_teacher(meta, parent.ref)
    train_path = (meta.get("dataset") or {}).get("train")
    holdout = spec.holdout_path or (meta.get("dataset") or {}).get("validation")
    if not train_path or not holdout:
        raise CompressError(
            f"{parent.ref}: metadata.json names no {'training' if not train_path else 'validation'} data "
            f"(`dataset.{'train' if not train_path else 'validation'}`); fine-tuning and distillation need the "
            f"teacher's training data and the gate held-out rows. Pass `holdout_path` in the spec, or retrain "
            f"with mlplatform.train (it records both)."
        )
    task = ray.remote(num_cpus=spec.num_cpus, max_retries=0)(_task)
    ref = task.options(label_selector=selector, name=TASK_NAME).remote(
        meta, (src / layout.WEIGHTS).read_bytes(), spec.model_dump(mode="json"), train_path, holdout
    )
    try:
        out = ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
        if isinstance(cause, CompressError):
            raise cause from None
        raise CompressError(f"The compression task for {parent.ref} failed: {cause}") from None
    residency.record("ran", what="compress", name=parent.ref, job_id=ray.get_runtime_context().get_job_id(),
                     classification=classification, regions=[out["region"] or "(none)"], node_ids=[out["node_id"]])
    results = []
    for r in out["results"]:
        version_ref = None
        if r["gate"]["passed"] or spec.register_failed:
            version_ref = _register(parent, meta, r, names[r["method"]], src, work, out, classification,
                                    root, key, actor).ref
        results.append(CompressResult(r["method"], names[r["method"]], version_ref, r["params_before"],
                                      r["params_after"], r["params"], r["gate"], r["seconds"]))
    return CompressReport(parent.ref, out["region"], out["node_id"], tuple(results))


def _task(meta: dict[str, Any], weights: bytes, spec_json: dict[str, Any], train_path: str,
          holdout: str) -> dict[str, Any]:
    """Runs as a Ray task on a node the residency selector allows: reads the data there, returns weights."""
    import ray
    import torch

    from mlplatform.compress import _work
    from mlplatform.residency import REGION_LABEL

    # As many threads as CPUs reserved: on a shared node more would slow the neighbours.
    torch.set_num_threads(max(1, int(spec_json.get("num_cpus") or 1)))
    context = ray.get_runtime_context()
    return {
        "results": _work.compress(meta, weights, spec_json, train_path, holdout),
        "region": context.get_node_labels().get(REGION_LABEL),
        "node_id": context.get_node_id(),
    }


def _register(parent, meta: dict[str, Any], r: dict[str, Any], name: str, src: Path, work: Path,
              out: dict[str, Any], classification: str | None, root: Any, key: Any, actor: str | None):
    """Write the student as a normal training artifact (what load_model and export read) and register it."""
    import pyarrow.parquet as pq

    from mlplatform import registry
    from mlplatform.train.artifact import write_artifact

    compression = {"method": r["method"], "kind": _KIND[r["method"]], **r["params"],
                   "params_before": r["params_before"], "params_after": r["params_after"], "gate": r["gate"]}
    weights = work / f"{r['method']}.safetensors"
    weights.write_bytes(r["weights"])
    g = r["gate"]
    metrics = {"val_accuracy": g["accuracy"], "teacher_val_accuracy": g["teacher_accuracy"],
               "top1_agreement": g["top1_agreement"]}
    student_meta = {
        **{k: v for k, v in meta.items() if k not in ("training", "training_cost", "metrics", "ray_job_id")},
        "model_ref": "builtin:digits_mlp",
        "model_kwargs": r["model_kwargs"],
        "metrics": metrics,
        "compression": compression,
        "compressed_from": parent.ref,
        "ray_job_id": os.environ.get("RAY_JOB_SUBMISSION_ID"),
    }
    target = work / f"{r['method']}-artifact"
    write_artifact(str(target), str(weights), student_meta, pq.read_table(src / layout.SAMPLE),
                   residency={"classification": classification, "regions": [out["region"]] if out["region"] else [],
                              "node_ids": [out["node_id"]]})
    lineage: dict[str, Any] = {
        "metrics": metrics,
        "classification": classification,
        "extra": {"compressed_from": parent.ref, "compression": compression},
    }
    if meta.get("input_signature"):
        lineage["input_signature"] = meta["input_signature"]
    encrypt = None
    if parent.encrypted:
        from mlplatform.registry import default_key

        encrypt = key if key is not None else default_key()
    return registry.register(target, name, root=root, lineage=lineage, encrypt_key=encrypt, actor=actor)


def _check_some_node(selector: dict[str, str]) -> None:
    """Fail fast: Ray leaves a task whose selector no node satisfies pending forever, without an error."""
    import ray

    from mlplatform._internal import placement

    alive = [n.get("Labels") or {} for n in ray.nodes() if n.get("Alive")]
    if not any(placement.matches(labels, selector) for labels in alive):
        raise CompressError(
            f"No live node satisfies {json.dumps(selector)} (`label_selector` narrowed to the teacher's regions); "
            f"the compression task would wait forever. Start a node there or change `label_selector`."
        )


def _methods(spec: CompressSpec) -> list[str]:
    return [m for m, on in (("prune", spec.prune.enabled), ("distill", spec.distill.enabled)) if on]


def _name(spec: CompressSpec, teacher: str, method: str) -> str:
    own = spec.prune.name if method == "prune" else spec.distill.name
    return own or f"{teacher}-{_KIND[method]}"
