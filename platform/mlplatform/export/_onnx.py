"""torch → ONNX (dynamo exporter), ONNX Runtime graph optimization, INT8 quantization, sessions."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

import numpy as np

from mlplatform._internal import onnx_files, storage
from mlplatform.errors import ExportError, OnnxModelError

from mlplatform.export._data import Signature

OUTPUT_NAME = "output"


def export_fp32(model, sig: Signature, opset: int, path: Path, model_ref: str) -> None:
    """Trace `model` with the dynamo exporter into `path`, batch axis dynamic, other axes fixed."""
    import torch

    storage.check_write(path)  # torch writes the file itself
    # Batch 2, not 1: torch.export specializes a dimension traced at size 0 or 1.
    example = torch.from_numpy(sig.example(2))
    batch = torch.export.Dim("batch")
    try:
        # The exporter prints progress lines to stdout; a job's output should hold only the report.
        with contextlib.redirect_stdout(io.StringIO()), _quiet("torch.onnx", "torch.export"), torch.no_grad():
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, input_names=[sig.name],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), optimize=True, verbose=False,
            )
            program.save(str(path))
    except Exception as e:  # the exporter raises many types; all mean "this model did not export"
        raise ExportError(
            f"torch.onnx.export (dynamo, opset {opset}) could not export {model_ref}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Check that forward() takes one {sig.dtype} tensor of "
            f"shape {list(sig.shape)} and is traceable by torch.export; try another `opset`."
        ) from None


def optimize(src: Path, dst: Path) -> None:
    """Save ONNX Runtime's offline-optimized graph of `src` as `dst`.

    ORT_ENABLE_EXTENDED, not ALL: ALL adds layout transforms tuned to this machine's CPU,
    which ORT documents as unsafe to save and run elsewhere; EXTENDED fusions are portable.
    """
    import onnxruntime as ort

    storage.check_write(dst)  # ONNX Runtime writes the file itself
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    _load(src, options)


def quantize_int8(
    src: Path, dst: Path, mode: str, work: Path, calibration: np.ndarray | None, input_name: str,
    per_channel: bool, reduce_range: bool,
) -> None:
    """INT8 of the un-optimized FP32 graph, then optimized like FP32.

    dynamic: int8 weights, activations quantized per batch at run time (linear/transformer
    models). static: QDQ with activation ranges calibrated on training rows (conv nets).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "model.pre.onnx"
    quantized = work / "model.int8.raw.onnx"
    storage.check_write(work)  # onnxruntime.quantization writes its files itself
    try:
        # Shape inference + fusions that quantization expects (the "pre-process" step ORT recommends).
        with contextlib.redirect_stdout(io.StringIO()):
            quant_pre_process(str(src), str(pre))
    except Exception:  # symbolic shape inference fails on some graphs; quantize the plain graph then
        storage.copy_file(src, pre)
    try:
        with _quiet(""):
            if mode == "dynamic":
                quantize_dynamic(
                    str(pre), str(quantized), weight_type=QuantType.QInt8,
                    per_channel=per_channel, reduce_range=reduce_range,
                )
            else:
                quantize_static(
                    str(pre), str(quantized), _Reader(input_name, calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=per_channel, reduce_range=reduce_range,
                )
    except Exception as e:  # onnxruntime.quantization raises plain exceptions of many kinds
        raise ExportError(
            f"onnxruntime.quantization ({mode}) failed on {src.name}: {type(e).__name__}: {e}. "
            f"Try `quantization_mode: {'static' if mode == 'dynamic' else 'dynamic'}` or `quantize: none`."
        ) from None
    optimize(quantized, dst)


@contextlib.contextmanager
def _quiet(*names: str):
    """Raise loggers to ERROR for the duration: the exporter warns about optional packages
    (torchvision) and quantize_* asks on the root logger for pre-processing already done."""
    loggers = [logging.getLogger(n) if n else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class _Reader:
    """CalibrationDataReader over training rows, in batches of 32 (any batch fits the dynamic axis)."""

    def __init__(self, input_name: str, rows: np.ndarray):
        self._batches = iter([{input_name: rows[i : i + 32]} for i in range(0, len(rows), 32)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def tuned_options(num_cpus: float) -> dict[str, object]:
    """ORT CPU session settings for a process that owns `num_cpus` CPUs (a Serve replica, a benchmark).

    - intra-op threads = whole CPUs owned (at least 1): more threads than CPUs only contend.
    - one inter-op thread, sequential execution: these graphs are chains of ops; parallel
      branches would need CPUs the replica does not own.
    - spinning off below one whole CPU: an idle thread that spins burns the share of the CPU
      that belongs to other replicas; with whole CPUs it saves the wake-up latency.
    - memory arena on: small models allocate the same buffers every call; the arena reuses them.
    - ORT_ENABLE_ALL: the session is built on the node that runs it, so the CPU-specific layout
      transforms (unsafe only in a saved graph moved elsewhere) are safe and the fastest.
    """
    return {
        "intra_op_num_threads": max(1, int(num_cpus)),
        "inter_op_num_threads": 1,
        "execution_mode": "sequential",
        "graph_optimization_level": "all",
        "enable_cpu_mem_arena": True,
        "allow_spinning": num_cpus >= 1,
    }


def session_options(settings: dict[str, object]):
    """An ort.SessionOptions from tuned_options()' plain dict (which is what status records)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(settings["intra_op_num_threads"])
    options.inter_op_num_threads = int(settings["inter_op_num_threads"])
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[str(settings["graph_optimization_level"])]
    options.enable_cpu_mem_arena = bool(settings["enable_cpu_mem_arena"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings["allow_spinning"] else "0")
    options.log_severity_level = 3
    return options


def session(path: str | os.PathLike, threads: int):
    """An ORT CPU session as serving would create it (tuned_options for `threads` CPUs).

    Raises:
        OnnxModelError: the file is missing, corrupt, truncated or not a model ORT can run.
    """
    return _load(Path(path), session_options(tuned_options(threads)))


def session_from_bytes(model: bytes, threads: int, name: str):
    """session() for a model held in memory (a benchmark task on another node gets the bytes)."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, session_options(tuned_options(threads)), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own pybind error types
        raise OnnxModelError(f"{name}: ONNX Runtime cannot load it ({str(e).strip()[:300]}).") from None


def _load(path: Path, options):
    import onnxruntime as ort

    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file; re-run the export that should have written it.")
    try:
        onnx_files.check_external_data(path)
    except ValueError as e:
        raise OnnxModelError(str(e)) from None
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind types (InvalidProtobuf, Fail, ...)
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise OnnxModelError(
            f"{path}: ONNX Runtime cannot load it ({detail}). The file is corrupt or truncated "
            f"({path.stat().st_size} bytes); re-run the export, or fetch the version again from the registry "
            f"(`mlplatform registry verify` tells whether the stored copy is intact)."
        ) from None
