"""CPU-optimized export: torch → ONNX FP32 and INT8, accuracy gates, CPU benchmark, registration.

    from mlplatform.export import ExportSpec, export_model, format_report
    report = export_model("digits@latest", ExportSpec(), root="/data/registry")
    print(format_report(report))      # gates (with shortfalls), deployable flags, benchmark
    report.deployable                 # {"onnx_fp32": True, "onnx_int8": True, "onnx_int8_qdq": True, ...}

The exported version is the same model's next version: the source files unchanged plus every
candidate (model.onnx, model.int8.onnx, model.int8.qdq.onnx, model.<pruned|distilled>[.int8].onnx
for ExportSpec.students) and export_report.json; lineage `extra.exported_from`, and
`extra.export` with the gates' verdicts and the benchmark per node group (serving's `variant: auto`).
Heavy imports (torch, onnxruntime) happen inside the functions.
"""

from mlplatform._internal.artifact_layout import EXPORT_REPORT as REPORT_FILE
from mlplatform._internal.artifact_layout import ONNX_FP32 as FP32_FILE
from mlplatform._internal.artifact_layout import ONNX_INT8 as INT8_FILE
from mlplatform.export._cpu import cpu_features
from mlplatform.export._onnx import session_options, tuned_options
from mlplatform.export._pipeline import export_artifact, export_model, gate_variant, make_spec
from mlplatform.export._report import (
    BenchmarkRow,
    CpuFeatures,
    ExportReport,
    GateCheck,
    VariantReport,
    format_report,
)
from mlplatform.export._spec import BenchmarkSpec, ExportSpec, GateSpec, GatesSpec, QuantMode, Quantize

__all__ = [
    "FP32_FILE",
    "INT8_FILE",
    "REPORT_FILE",
    "BenchmarkRow",
    "BenchmarkSpec",
    "CpuFeatures",
    "ExportReport",
    "ExportSpec",
    "GateCheck",
    "GateSpec",
    "GatesSpec",
    "QuantMode",
    "Quantize",
    "VariantReport",
    "cpu_features",
    "export_artifact",
    "export_model",
    "format_report",
    "gate_variant",
    "make_spec",
    "session_options",
    "tuned_options",
]
