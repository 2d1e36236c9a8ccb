"""export_model(): registry version → ONNX FP32 + INT8 → gates → benchmark → new registry version.

Everything is built in a private temporary directory; the new version is registered only
once every file and the report exist, so a failure at any step registers nothing.
"""

from __future__ import annotations

import dataclasses
import logging
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

logger = logging.getLogger(__name__)

# Scratch file of the exporter, never part of the version.
_RAW_ONNX = "model.raw.onnx"
# lineage.extra.compression.method of a student → the prefix of its variants and files.
_STUDENT_KIND = {"prune": "pruned", "distill": "distilled"}


def make_spec(config: str | os.PathLike | None = None, *, quantize: str | None = None,
              threads: int | None = None, classification: str | None = None,
              students: list[str] | None = None) -> ExportSpec:
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
    if students:
        data["students"] = list(students)
    return _config.validate(data, ExportSpec, "--quantize/--threads/--classification/--student")


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
    if spec.benchmark.enabled and spec.benchmark.node_groups:
        _join_the_jobs_cluster()  # first: the policy read next is then the cluster's, for every step
    policy = residency.current()
    try:
        # Made from the source's data, the export keeps its classification or a higher one.
        classification = residency.inherit(
            policy, parent.lineage.classification, spec.classification,
            field="classification", source=f"the source version {parent.ref}",
        )
        if policy is not None:
            _check_where_this_runs(policy, classification, parent.ref)
        students = _students(spec.students, parent, root)
        bench_on = _bench_selectors(spec, policy, classification)
        with residency.confined(policy, classification):
            registry.check_writable(root, spec.name or parent.name)  # before the export work, not after it
            # Scratch copies (the decrypted source, ONNX files, the libraries' own temporary
            # files) stay inside the classification's storage prefixes too.
            work = storage.temp_dir("mlplatform-export-")
            try:
                with storage.tempfile_dir(work):
                    version, report = _export_and_register(
                        parent, spec, work, classification, root, key, actor, students, bench_on
                    )
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except ResidencyError as e:
        residency.record("denial", what="export", model=parent.name, source=parent.ref, reason=str(e))
        raise
    return dataclasses.replace(report, version_ref=version.ref)


def _join_the_jobs_cluster() -> None:
    """Inside a Ray job (`ray job submit` sets RAY_ADDRESS) connect to its cluster, as the residency
    check below would; a plain process off any cluster stays unconnected."""
    import ray

    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")


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


def _students(refs: list[str], parent: Any, root: Any) -> dict[str, Any]:
    """kind ("pruned"/"distilled") → the registered student version, each checked against the source.

    Raises:
        ExportError: a ref does not resolve, is not a student of the source, or two share a kind.
        InputSignatureError: a student's input signature differs from the source's.
    """
    from mlplatform import registry
    from mlplatform.errors import InputSignatureError, PlatformError

    out: dict[str, Any] = {}
    for ref in refs:
        try:
            student = registry.resolve(ref, root=root)
        except PlatformError as e:
            raise ExportError(
                f"Got {ref!r} in `students` (--student); it is not a registered version ({e}). Register the "
                f"students of {parent.ref} first: `ray job submit -- python jobs/compress.py --config "
                f"jobs/configs/compress-digits.yaml`, then pass the refs it prints."
            ) from None
        extra = student.lineage.extra or {}
        teacher = extra.get("compressed_from")
        try:
            teacher_ref = registry.resolve(teacher, root=root).ref if teacher else None
        except PlatformError:
            teacher_ref = teacher
        if teacher_ref != parent.ref:
            raise ExportError(
                f"Got {student.ref!r} in `students`; its lineage says compressed_from {teacher!r}, not the export's "
                f"source {parent.ref}. A student is gated against its own teacher: export {teacher or 'its teacher'} "
                f"with it, or compress {parent.ref} (jobs/compress.py) and pass that student."
            )
        method = (extra.get("compression") or {}).get("method")
        kind = _STUDENT_KIND.get(method)
        if kind is None:
            raise ExportError(
                f"Got {student.ref!r} in `students`; its lineage `compression.method` is {method!r}, must be "
                f"{' or '.join(_STUDENT_KIND)}. Register it with jobs/compress.py."
            )
        if kind in out:
            raise ExportError(
                f"Got two {kind} students in `students` ({out[kind].ref}, {student.ref}); a version holds one of "
                f"each kind (model.{kind}.onnx). Export once per student."
            )
        sig, own = parent.lineage.input_signature, student.lineage.input_signature
        if sig and own and sig != own:
            raise InputSignatureError(
                f"Got {student.ref!r} in `students`; its input signature {own} differs from {parent.ref}'s {sig}. "
                f"A student must take exactly the teacher's inputs to be served in its place."
            )
        out[kind] = student
    return out


def _bench_selectors(spec: ExportSpec, policy: Any, classification: str | None) -> dict[str, dict[str, str]] | None:
    """node group → the label selector its benchmark task gets (narrowed by the residency policy);
    None: benchmark in this process (no groups asked for, or no Ray cluster to run them on)."""
    groups = spec.benchmark.node_groups
    if not spec.benchmark.enabled or not groups:
        return None
    import ray

    if not ray.is_initialized():
        logger.warning("benchmark.node_groups %s asked for, but no Ray cluster is connected: benchmarking in "
                       "this process instead (connect, or run as a Ray job, to measure on those groups)", groups)
        return None
    selectors = {g: {_bench_label(): g} for g in groups}
    if policy is not None:
        selectors = {g: policy.place(classification, sel, "benchmark.node_groups") for g, sel in selectors.items()}
    return selectors


def _bench_label() -> str:
    from mlplatform.export._bench import NODE_GROUP_LABEL

    return NODE_GROUP_LABEL


def _export_and_register(parent: Any, spec: ExportSpec, work: Path, classification: str | None,
                         root: Any, key: Any, actor: str | None, students: dict[str, Any] | None = None,
                         bench_on: dict[str, dict[str, str]] | None = None) -> tuple[Any, ExportReport]:
    from mlplatform import registry

    src = work / "source"
    # The pinned version, not `ref`: an alias moved meanwhile must not change what is exported.
    registry.fetch(parent.ref, src, root=root, key=key)
    student_dirs = {}
    for kind, student in (students or {}).items():
        student_dirs[kind] = work / f"student-{kind}"
        registry.fetch(student.ref, student_dirs[kind], root=root, key=key)
    report = export_artifact(
        src, work / "exported", spec, source_ref=parent.ref, fallback_signature=parent.lineage.input_signature,
        students=student_dirs, bench_on=bench_on, classification=classification,
    )
    overrides: dict[str, Any] = {
        "metrics": {**parent.lineage.metrics, **_lineage_metrics(report)},
        "classification": classification,
        # Where the model was trained stays part of its lineage, whoever exports it.
        "training_regions": parent.lineage.training_regions,
        "training_node_ids": parent.lineage.training_node_ids,
        "extra": {
            "exported_from": parent.ref,
            "export": {
                "deployable": report.deployable, "opset": report.opset, "quantization": report.quantization,
                # Serving's `variant: auto` picks from these: rows/s per runtime and batch size, per node group.
                "benchmarks": [b.to_json() for b in report.benchmarks],
                "skipped": dict(report.skipped),
                "students": {kind: s.ref for kind, s in (students or {}).items()},
            },
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
    students: dict[str, str | os.PathLike] | None = None,
    bench_on: dict[str, dict[str, str]] | None = None,
    classification: str | None = None,
) -> ExportReport:
    """Export a training artifact directory into `out_dir` (new or empty), without the registry.

    `out_dir` receives the artifact's files plus every candidate (model.onnx, model.int8.onnx,
    model.int8.qdq.onnx, model.<kind>[.int8].onnx per student) and export_report.json, all at
    once: it is built beside `out_dir` and renamed into place.

    Args:
        students: kind ("pruned"/"distilled") → a student's artifact directory; gated against
            this artifact's torch model (the teacher) with `gates.student`.
        bench_on: node group → label selector: benchmark as one Ray task on each (else here).

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
            skipped: dict[str, str] = {}
            mode = None
            if spec.quantize == Quantize.INT8:
                mode = _mode(spec.quantization_mode, model)
                calib = _data.calibration(artifact_dir, meta, sig, task, spec.calibration_rows) if mode == "static" else None
                per_channel = spec.per_channel if spec.per_channel is not None else mode == "static"
                _onnx.quantize_int8(
                    raw / _RAW_ONNX, staging / layout.ONNX_INT8, mode, raw, calib, sig.name, per_channel, spec.reduce_range
                )
                files["onnx_int8"] = layout.ONNX_INT8
                _static_qdq(spec, mode, task, artifact_dir, meta, sig, raw, staging, files, skipped)
            for kind, student_dir in (students or {}).items():
                _student(kind, Path(student_dir), sig, spec, raw, staging, files)
        finally:
            shutil.rmtree(raw, ignore_errors=True)

        threads = spec.benchmark.threads
        sessions = {name: _onnx.session(staging / f, threads) for name, f in files.items()}
        reference, measured = _gate.evaluate(model, sessions, held.x, held.y, task, sig.name)
        gates = {"onnx_fp32": spec.gates.fp32, "onnx_int8": spec.gates.int8, "onnx_int8_qdq": spec.gates.int8_qdq}
        variants = tuple(
            _gate.judge(name, f, (staging / f).stat().st_size, measured[name], task, gates.get(name, spec.gates.student))
            for name, f in files.items()
        )
        benchmarks = ()
        if spec.benchmark.enabled:
            b = spec.benchmark
            if bench_on:
                onnx = {name: (staging / f).read_bytes() for name, f in files.items()}
                benchmarks = _bench_remote(bench_on, model, onnx, held.x, sig.name, b, classification)
            else:
                benchmarks = (_bench.here(model, sessions, held.x, sig.name, b.batch_sizes, threads,
                                          b.seconds_per_case, b.warmup_runs),)
        bench = benchmarks[0].rows if benchmarks else ()
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
            benchmarks=benchmarks,
            skipped=skipped,
        )
        storage.atomic_write(staging / layout.EXPORT_REPORT, report.dumps())
        storage.replace_dir(staging, out)  # `out` was checked new or empty above
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _static_qdq(spec: ExportSpec, mode: str, task: str, artifact_dir: Path, meta: dict[str, Any], sig: Any,
                raw: Path, staging: Path, files: dict[str, str], skipped: dict[str, str]) -> None:
    """The static QDQ INT8 candidate beside a dynamic onnx_int8 (static mode already is one).

    Optional: a graph it cannot quantize is recorded in `skipped`, not an export failure.
    """
    from mlplatform.export import _data, _onnx

    if not spec.static_qdq:
        return
    if mode == "static":
        skipped["onnx_int8_qdq"] = "onnx_int8 is already static QDQ (quantization_mode static)"
        return
    if task == "causal_lm":
        # Activation ranges of a transformer vary per sequence; calibrated fixed ranges lose
        # too much, and calibration over sequences is slow. Dynamic INT8 is its candidate.
        skipped["onnx_int8_qdq"] = "not built for language models (dynamic INT8 is their INT8 candidate)"
        return
    calib = _data.calibration(artifact_dir, meta, sig, task, spec.calibration_rows)
    per_channel = spec.per_channel if spec.per_channel is not None else True
    try:
        _onnx.quantize_int8(raw / _RAW_ONNX, staging / layout.ONNX_INT8_QDQ, "static", raw, calib, sig.name,
                            per_channel, spec.reduce_range)
    except ExportError as e:
        skipped["onnx_int8_qdq"] = str(e)
        return
    files["onnx_int8_qdq"] = layout.ONNX_INT8_QDQ


def _student(kind: str, student_dir: Path, sig: Any, spec: ExportSpec, raw: Path, staging: Path,
             files: dict[str, str]) -> None:
    """A compressed student → <kind>_onnx_fp32 (+ <kind>_onnx_int8, dynamic) in `staging`."""
    from mlplatform.errors import InputSignatureError
    from mlplatform.export import _data, _onnx
    from mlplatform.train import load_model, read_metadata

    meta = read_metadata(student_dir)
    own = _data.signature(meta, str(student_dir)) if meta.get("input_signature") else sig
    if (own.name, own.dtype, tuple(own.shape)) != (sig.name, sig.dtype, tuple(sig.shape)):
        raise InputSignatureError(
            f"The {kind} student takes {own.name} {own.dtype} {list(own.shape)}, the teacher {sig.name} {sig.dtype} "
            f"{list(sig.shape)}; a student must take exactly the teacher's inputs."
        )
    student_raw = raw / f"model.{kind}.raw.onnx"
    _onnx.export_fp32(load_model(student_dir), sig, spec.opset, student_raw, f"the {kind} student")
    fp32, int8 = f"{kind}_onnx_fp32", f"{kind}_onnx_int8"
    _onnx.optimize(student_raw, staging / layout.VARIANT_FILES[fp32])
    files[fp32] = layout.VARIANT_FILES[fp32]
    if spec.quantize == Quantize.INT8:
        _onnx.quantize_int8(student_raw, staging / layout.VARIANT_FILES[int8], "dynamic", raw, None, sig.name,
                            bool(spec.per_channel), spec.reduce_range)
        files[int8] = layout.VARIANT_FILES[int8]


def _bench_remote(selectors: dict[str, dict[str, str]], model: Any, onnx: dict[str, bytes], x: Any, input_name: str,
                  b: Any, classification: str | None) -> tuple[Any, ...]:
    """One benchmark task per node group, placed by its selector, all in parallel; their NodeBenchmarks.

    Raises:
        ExportError: no live node of a group can hold the task, or a task failed or timed out.
    """
    import ray

    from mlplatform import residency
    from mlplatform._internal import placement
    from mlplatform.cluster.inventory import from_ray_nodes
    from mlplatform.export import _bench
    from mlplatform.export._report import NodeBenchmark
    from mlplatform.residency import guard

    nodes = [n for n in from_ray_nodes(ray.nodes()) if n.alive]
    policy = residency.current()
    env = {"env_vars": {guard.CLASSIFICATION_ENV: policy.resolve(classification)}} if policy else None
    task = ray.remote(_bench.on_this_node)
    pending = {}
    for group, selector in selectors.items():
        # The task needs `threads` CPUs on one node: Ray would leave it pending forever otherwise.
        if placement.capacity(nodes, selector, {"CPU": b.threads}).largest < 1:
            groups = sorted({f"{n.group} ({n.resources.get('CPU', 0):g} CPU)" for n in nodes})
            raise ExportError(
                f"Got {group!r} in `benchmark.node_groups`; no live node matches {selector} with {b.threads} CPUs "
                f"(`benchmark.threads`). Live node groups: {', '.join(groups)}. Name one of them or lower threads."
            )
        pending[group] = task.options(
            label_selector=selector, num_cpus=b.threads, **({"runtime_env": env} if env else {})
        ).remote(model, onnx, x, input_name, b.batch_sizes, b.threads, b.seconds_per_case, b.warmup_runs)
    out = []
    for group, ref in pending.items():
        try:
            out.append(NodeBenchmark.from_json(ray.get(ref, timeout=b.timeout_s)))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            raise ExportError(
                f"The benchmark on node group {group!r} did not finish in {b.timeout_s:g} s (`benchmark.timeout_s`); "
                f"lower `benchmark.seconds_per_case` or batch sizes, or raise the timeout."
            ) from None
        except ray.exceptions.RayError as e:
            raise ExportError(f"The benchmark on node group {group!r} failed: {str(e).splitlines()[0]}") from None
    return tuple(out)


def gate_variant(onnx_path: str | os.PathLike, artifact_dir: str | os.PathLike, spec: ExportSpec | None = None,
                 variant: str = "onnx_int8"):
    """Re-run one variant's accuracy gate on an existing ONNX file against the artifact's torch model.

    Raises:
        OnnxModelError: the file is corrupt or truncated; InputSignatureError, HoldoutDataError.
    """
    from mlplatform.export import _data, _gate, _onnx
    from mlplatform.train import load_model, read_metadata

    spec = spec or ExportSpec()
    if variant not in layout.VARIANT_FILES or variant == "torch":
        raise ExportError(f"Got {variant!r} for `variant`; must be one of "
                          f"{', '.join(v for v in layout.VARIANT_FILES if v != 'torch')}.")
    meta = read_metadata(artifact_dir)
    sig = _data.signature(meta, str(artifact_dir))
    task = _task(meta, str(artifact_dir))
    sess = _onnx.session(onnx_path, spec.benchmark.threads)  # fails fast on a damaged file
    model = load_model(artifact_dir)
    held = _data.holdout(meta, artifact_dir, sig, task, spec.holdout_path, spec.max_holdout_rows)
    _, measured = _gate.evaluate(model, {variant: sess}, held.x, held.y, task, sig.name)
    gate = {"onnx_fp32": spec.gates.fp32, "onnx_int8": spec.gates.int8,
            "onnx_int8_qdq": spec.gates.int8_qdq}.get(variant, spec.gates.student)
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
