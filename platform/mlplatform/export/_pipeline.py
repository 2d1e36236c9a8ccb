"""export_model(): registry version → ONNX FP32 + INT8 → gates → benchmark → new registry version.

Everything is built in a private temporary directory; the new version is registered only
once every file and the report exist, so a failure at any step registers nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlplatform._internal import artifact_layout as layout
from mlplatform._internal import storage
from mlplatform.errors import ExportError

from mlplatform.export._report import ExportReport
from mlplatform.export._spec import ExportSpec, QuantMode, Quantize

# Scratch file of the exporter, never part of the version.
_RAW_ONNX = "model.raw.onnx"


def make_spec(config: str | os.PathLike | None = None, *, quantize: str | None = None,
              threads: int | None = None, classification: str | None = None) -> ExportSpec:
    """An ExportSpec from an optional YAML file with command-line overrides applied (validated).

    Raises:
        SpecError: the file or an override is invalid.
    """
    from mlplatform import config as _config

    spec = _config.load(config, ExportSpec) if config else ExportSpec()
    data = spec.model_dump(mode="json")
    if quantize is not None:
        data["quantize"] = quantize
    if threads is not None:
        data["benchmark"]["threads"] = threads
    if classification is not None:
        data["classification"] = classification
    return _config.validate(data, ExportSpec, "--quantize/--threads/--classification")


def export_model(
    ref: str,
    spec: ExportSpec | None = None,
    *,
    root: str | os.PathLike | None = None,
    key: Any = None,
    actor: str | None = None,
) -> ExportReport:
    """Export a registered version and register the result as the model's next version.

    The new version holds the source version's files unchanged plus model.onnx,
    model.int8.onnx and export_report.json; its lineage records `exported_from` (the
    source ref) and the gate metrics. The returned report carries the new `version_ref`.
    Its classification is the source version's, or `spec.classification` if that keeps or
    raises it; everything the export writes (scratch included) stays within that
    classification's storage prefixes under the cluster's residency policy.

    Args:
        ref: 'name', 'name@3', 'name@latest' or 'name@alias'.
        key: registry key for an encrypted source (default: MLPLATFORM_REGISTRY_KEY[_FILE]);
            the new version is encrypted with it too.

    Raises:
        ModelNotFound, VersionNotFound, AliasNotFound, IntegrityError, EncryptionKeyError,
        RegistryNotWritable (from the registry); InputSignatureError, HoldoutDataError,
        OnnxModelError, ExportError (export itself); ResidencyError (classification lowered or
        unknown, registry root outside its storage prefixes). Nothing is registered on any of them.
    """
    from mlplatform import access, registry, residency
    from mlplatform.errors import ResidencyError

    spec = spec or ExportSpec()
    parent = registry.resolve(ref, root=root)
    access.require("registry.export", f"registry:{spec.name or parent.name}")
    policy = residency.current()
    try:
        # Made from the source's data, the export keeps its classification or a higher one.
        classification = residency.inherit(
            policy, parent.lineage.classification, spec.classification,
            field="classification", source=f"the source version {parent.ref}",
        )
        if policy is not None:
            _check_where_this_runs(policy, classification, parent.ref)
        with residency.confined(policy, classification):
            registry.check_writable(root, spec.name or parent.name)  # before the export work, not after it
            # Scratch copies (the decrypted source, ONNX files, the libraries' own temporary
            # files) stay inside the classification's storage prefixes too.
            work = storage.temp_dir("mlplatform-export-")
            try:
                with storage.tempfile_dir(work):
                    version, report = _export_and_register(parent, spec, work, classification, root, key, actor)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except ResidencyError as e:
        residency.record("denial", what="export", model=parent.name, source=parent.ref, reason=str(e))
        raise
    return dataclasses.replace(report, version_ref=version.ref)


def _check_where_this_runs(policy: Any, classification: str, ref: str) -> None:
    """Export runs in this process: it must be inside the classification's regions (the runtime
    guard's check, for a driver), and where it ran goes to the audit trail like a job's placement."""
    import ray

    from mlplatform import residency
    from mlplatform.residency import guard

    if not ray.is_initialized():
        if not os.environ.get("RAY_ADDRESS"):
            return  # not in a Ray job nor connected: no cluster node to check
        ray.init(logging_level="WARNING")  # the job's cluster (`ray job submit` sets RAY_ADDRESS)
    guard.check_driver(policy, classification)
    context = ray.get_runtime_context()
    region = context.get_node_labels().get(residency.REGION_LABEL)
    residency.record("placement", what="export", name=ref, job_id=context.get_job_id(), policy=policy.name,
                     classification=classification, selector={})
    residency.record("ran", what="export", name=ref, job_id=context.get_job_id(), classification=classification,
                     regions=[region or "(none)"], node_ids=[context.get_node_id()])


def _export_and_register(parent: Any, spec: ExportSpec, work: Path, classification: str | None,
                         root: Any, key: Any, actor: str | None) -> tuple[Any, ExportReport]:
    from mlplatform import registry

    src = work / "source"
    # The pinned version, not `ref`: an alias moved meanwhile must not change what is exported.
    registry.fetch(parent.ref, src, root=root, key=key)
    report = export_artifact(
        src, work / "exported", spec, source_ref=parent.ref, fallback_signature=parent.lineage.input_signature
    )
    overrides: dict[str, Any] = {
        "metrics": {**parent.lineage.metrics, **_lineage_metrics(report)},
        "classification": classification,
        # Where the model was trained stays part of its lineage, whoever exports it.
        "training_regions": parent.lineage.training_regions,
        "training_node_ids": parent.lineage.training_node_ids,
        "extra": {
            "exported_from": parent.ref,
            "export": {"deployable": report.deployable, "opset": report.opset, "quantization": report.quantization},
        },
    }
    if parent.lineage.input_signature:
        overrides["input_signature"] = parent.lineage.input_signature
    version = registry.register(
        work / "exported", spec.name or parent.name, root=root, lineage=overrides,
        encrypt_key=_encrypt_key(key) if parent.encrypted else None, actor=actor,
    )
    return version, report


def export_artifact(
    artifact_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spec: ExportSpec | None = None,
    *,
    source_ref: str | None = None,
    fallback_signature: Any = None,
) -> ExportReport:
    """Export a training artifact directory into `out_dir` (new or empty), without the registry.

    `out_dir` receives the artifact's files plus model.onnx, model.int8.onnx and
    export_report.json, all at once: it is built beside `out_dir` and renamed into place.

    Raises:
        TrainArtifactError, InputSignatureError, HoldoutDataError, OnnxModelError, ExportError.
    """
    import onnxruntime
    import torch

    from mlplatform.export import _bench, _cpu, _data, _gate, _onnx
    from mlplatform.train import load_model, read_metadata

    spec = spec or ExportSpec()
    artifact_dir = Path(artifact_dir)
    out = Path(storage.absolute(out_dir))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"Got {str(out)!r} for `out_dir`; it exists and is not empty. Pass a new or empty directory.")

    meta = read_metadata(artifact_dir)
    if not meta.get("input_signature") and fallback_signature:
        meta = {**meta, "input_signature": fallback_signature}
    where = source_ref or str(artifact_dir)
    sig = _data.signature(meta, where)
    task = _task(meta, where)
    model = load_model(artifact_dir)
    held = _data.holdout(meta, artifact_dir, sig, task, spec.holdout_path, spec.max_holdout_rows)

    staging = storage.staging_dir(out)
    try:
        for f in sorted(artifact_dir.rglob("*")):
            rel = f.relative_to(artifact_dir)
            if f.is_file() and str(rel) not in layout.EXPORT_FILES:
                storage.copy_file(f, staging / rel)
        raw = staging.parent / f"{staging.name}.raw"
        storage.check_write(raw)
        raw.mkdir()
        try:
            _onnx.export_fp32(model, sig, spec.opset, raw / _RAW_ONNX, meta.get("model_ref", "the model"))
            _onnx.optimize(raw / _RAW_ONNX, staging / layout.ONNX_FP32)
            files = {"onnx_fp32": layout.ONNX_FP32}
            mode = None
            if spec.quantize == Quantize.INT8:
                mode = _mode(spec.quantization_mode, model)
                calib = _data.calibration(artifact_dir, meta, sig, task, spec.calibration_rows) if mode == "static" else None
                per_channel = spec.per_channel if spec.per_channel is not None else mode == "static"
                _onnx.quantize_int8(
                    raw / _RAW_ONNX, staging / layout.ONNX_INT8, mode, raw, calib, sig.name, per_channel, spec.reduce_range
                )
                files["onnx_int8"] = layout.ONNX_INT8
        finally:
            shutil.rmtree(raw, ignore_errors=True)

        threads = spec.benchmark.threads
        sessions = {name: _onnx.session(staging / f, threads) for name, f in files.items()}
        reference, measured = _gate.evaluate(model, sessions, held.x, held.y, task, sig.name)
        gates = {"onnx_fp32": spec.gates.fp32, "onnx_int8": spec.gates.int8}
        variants = tuple(
            _gate.judge(name, f, (staging / f).stat().st_size, measured[name], task, gates[name])
            for name, f in files.items()
        )
        bench = ()
        if spec.benchmark.enabled:
            b = spec.benchmark
            bench = _bench.run(model, sessions, held.x, sig.name, b.batch_sizes, threads, b.seconds_per_case, b.warmup_runs)
        report = ExportReport(
            source_ref=source_ref,
            version_ref=None,
            model_ref=str(meta.get("model_ref")),
            task=task,
            opset=spec.opset,
            quantization=mode,
            holdout={"source": held.source, "rows": int(len(held.x)), "labeled": held.y is not None},
            reference_metrics=reference,
            variants=variants,
            benchmark=bench,
            threads=threads,
            cpu=_cpu.cpu_features(),
            torch_version=torch.__version__,
            onnxruntime_version=onnxruntime.__version__,
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        storage.atomic_write(staging / layout.EXPORT_REPORT, report.dumps())
        storage.replace_dir(staging, out)  # `out` was checked new or empty above
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def gate_variant(onnx_path: str | os.PathLike, artifact_dir: str | os.PathLike, spec: ExportSpec | None = None,
                 variant: str = "onnx_int8"):
    """Re-run one variant's accuracy gate on an existing ONNX file against the artifact's torch model.

    Raises:
        OnnxModelError: the file is corrupt or truncated; InputSignatureError, HoldoutDataError.
    """
    from mlplatform.export import _data, _gate, _onnx
    from mlplatform.train import load_model, read_metadata

    spec = spec or ExportSpec()
    if variant not in ("onnx_fp32", "onnx_int8"):
        raise ExportError(f"Got {variant!r} for `variant`; must be onnx_fp32 or onnx_int8.")
    meta = read_metadata(artifact_dir)
    sig = _data.signature(meta, str(artifact_dir))
    task = _task(meta, str(artifact_dir))
    sess = _onnx.session(onnx_path, spec.benchmark.threads)  # fails fast on a damaged file
    model = load_model(artifact_dir)
    held = _data.holdout(meta, artifact_dir, sig, task, spec.holdout_path, spec.max_holdout_rows)
    _, measured = _gate.evaluate(model, {variant: sess}, held.x, held.y, task, sig.name)
    gate = spec.gates.fp32 if variant == "onnx_fp32" else spec.gates.int8
    path = Path(onnx_path)
    return _gate.judge(variant, path.name, path.stat().st_size, measured[variant], task, gate)


def _task(meta: dict[str, Any], where: str) -> str:
    task = meta.get("task") or {"builtin:gpt": "causal_lm", "builtin:digits_mlp": "classification"}.get(
        meta.get("model_ref", "")
    )
    if task not in ("classification", "regression", "causal_lm"):
        raise ExportError(
            f"{where}: metadata.json has {task!r} for `task`; must be classification, regression or causal_lm "
            f"(the gate metric follows from it). Retrain with mlplatform.train or add the key."
        )
    return task


def _mode(mode: QuantMode, model) -> str:
    if mode != QuantMode.AUTO:
        return mode.value
    from torch import nn

    # Conv nets keep accuracy only with calibrated activation ranges; linear/transformer
    # layers do well with per-batch (dynamic) activation scales and need no calibration data.
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "static" if has_conv else "dynamic"


def _lineage_metrics(report: ExportReport) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for v in report.variants:
        for c in v.checks:
            metrics[f"{v.variant}_{c.metric}"] = c.value
    if report.benchmark:
        largest = max(r.batch_size for r in report.benchmark)
        for v in report.variants:
            s = report.speedup(v.variant, largest)
            if s:
                metrics[f"{v.variant}_speedup_b{largest}"] = round(s, 3)
    return metrics


def _encrypt_key(key: Any) -> Any:
    """The key to encrypt the exported version with: the caller's, else the registry's default."""
    from mlplatform.registry import default_key

    return key if key is not None else default_key()
