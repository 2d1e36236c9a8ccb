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


def session(path: str | os.PathLike, threads: int):
    """An ORT CPU session as serving would create it (full runtime optimization, `threads` intra-op).

    Raises:
        OnnxModelError: the file is missing, corrupt, truncated or not a model ORT can run.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return _load(Path(path), options)


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
