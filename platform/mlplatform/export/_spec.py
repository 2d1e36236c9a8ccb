"""ExportSpec: what a user writes to describe one export (opset, quantization, gates, benchmark)."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, field_validator

from mlplatform.config import Spec


class Quantize(str, Enum):
    """Which reduced-precision variant to build besides ONNX FP32."""

    NONE = "none"
    INT8 = "int8"


class QuantMode(str, Enum):
    """How INT8 is computed; `auto` picks dynamic for linear/transformer models, static for conv nets."""

    AUTO = "auto"
    DYNAMIC = "dynamic"
    STATIC = "static"


class GateSpec(Spec):
    """Thresholds one variant must meet against the FP32 torch model on held-out data.

    Classifiers are judged on top-1 agreement and accuracy drop; regressors and language
    models (on logits) on max and mean absolute error.
    """

    min_top1_agreement: float = Field(
        ge=0, le=1, description="Classifiers: least share of held-out rows whose top-1 class equals torch FP32's."
    )
    max_accuracy_drop: float = Field(
        ge=0, le=1, description="Classifiers: most held-out accuracy may fall below torch FP32's (0.01 = 1 point)."
    )
    max_abs_error: float = Field(
        gt=0, description="Regressors/LMs: largest allowed |variant - torch| over every output value (LMs: logits)."
    )
    max_mean_abs_error: float = Field(
        gt=0, description="Regressors/LMs: largest allowed mean |variant - torch| over every output value."
    )


def _fp32_gate() -> GateSpec:
    # Same math in another runtime: only float reassociation differs.
    return GateSpec(min_top1_agreement=0.999, max_accuracy_drop=0.001, max_abs_error=1e-3, max_mean_abs_error=1e-4)


def _int8_gate() -> GateSpec:
    # LM logit errors of dynamic INT8 on the built-in GPT are ~0.5 max / ~0.05 mean; see BENCHMARKS.md.
    return GateSpec(min_top1_agreement=0.98, max_accuracy_drop=0.01, max_abs_error=1.5, max_mean_abs_error=0.15)


def _student_gate() -> GateSpec:
    # A pruned or distilled student is another model: it may disagree with its teacher on a few
    # rows (0.97) as long as accuracy stays within 1 point; its raw outputs differ by design, so
    # the error limits only catch a broken student.
    return GateSpec(min_top1_agreement=0.97, max_accuracy_drop=0.01, max_abs_error=50.0, max_mean_abs_error=5.0)


class GatesSpec(Spec):
    """Accuracy gate thresholds per exported variant."""

    fp32: GateSpec = Field(default_factory=_fp32_gate, description="Thresholds for the ONNX FP32 variant.")
    int8: GateSpec = Field(default_factory=_int8_gate, description="Thresholds for the ONNX INT8 variant.")
    int8_qdq: GateSpec = Field(
        default_factory=_int8_gate, description="Thresholds for the static QDQ INT8 variant (onnx_int8_qdq)."
    )
    student: GateSpec = Field(
        default_factory=_student_gate,
        description="Thresholds for every student variant (pruned_*/distilled_*), judged against the TEACHER torch model.",
    )


class BenchmarkSpec(Spec):
    """The CPU benchmark stored with the version: torch FP32 and every ONNX candidate, per node group."""

    enabled: bool = Field(True, description="false skips the benchmark (the report then holds none).")
    threads: int = Field(
        2, ge=1, le=512, description="Threads for every runtime: torch.set_num_threads and ORT intra_op_num_threads."
    )
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 8, 32], min_length=1, description="Batch sizes to time, e.g. [1, 8, 32]."
    )
    seconds_per_case: float = Field(
        0.5, gt=0, le=60, description="Time spent measuring each (runtime, batch size) after warm-up."
    )
    warmup_runs: int = Field(3, ge=0, le=1000, description="Untimed runs before measuring each case.")
    node_groups: list[str] = Field(
        default_factory=list,
        description=(
            "Node groups (`ray.io/node-group`) to benchmark on, one Ray task each, so serving's `variant: auto` "
            "picks by numbers from the hardware it runs on; [] = in the export's own process."
        ),
    )
    timeout_s: float = Field(600, gt=0, description="Longest wait for one node group's benchmark task.")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("every batch size must be >= 1")
        return sorted(set(v))


class ExportSpec(Spec):
    """One export: torch → every ONNX candidate (FP32, INT8 dynamic or static, static QDQ, students),
    accuracy gates, CPU benchmark (per node group), registration."""

    opset: int = Field(
        18, ge=18, le=23, description="ONNX opset the dynamo exporter targets (pinned; 18 is torch's default)."
    )
    quantize: Quantize = Field(Quantize.INT8, description="`int8` builds model.int8.onnx; `none` only ONNX FP32.")
    quantization_mode: QuantMode = Field(
        QuantMode.AUTO,
        description="`auto` (dynamic for linear/transformer models, static for conv nets), `dynamic` or `static`.",
    )
    per_channel: bool | None = Field(
        None, description="Per-channel weight scales; default: true for static (conv nets), false for dynamic."
    )
    reduce_range: bool = Field(
        False, description="7-bit weights, against u8×s8 saturation on CPUs without VNNI (costs some accuracy)."
    )
    calibration_rows: int = Field(
        256, ge=1, le=100000, description="Training rows (the artifact's reference sample) used to calibrate static INT8."
    )
    holdout_path: str | None = Field(
        None,
        description=(
            "Held-out Parquet file for the gates (features + label, or the text column for LMs); default: the "
            "validation data named in the artifact's metadata (an error if it cannot be read), else, when "
            "training held out a split of its data, the artifact's reference sample (agreement only)."
        ),
    )
    max_holdout_rows: int = Field(2000, ge=1, description="Most held-out rows (LM: sequences) the gates evaluate.")
    static_qdq: bool = Field(
        True,
        description="With `quantize: int8`, also build the static QDQ candidate onnx_int8_qdq (calibrated like "
        "static mode) when `onnx_int8` itself is dynamic; serving's `variant: auto` may pick it.",
    )
    students: list[str] = Field(
        default_factory=list,
        description=(
            "Registry refs of compressed students of the source (registered by jobs/compress.py with lineage "
            "`compressed_from` = the source); each becomes <method>_onnx_fp32 and <method>_onnx_int8 candidates."
        ),
    )
    gates: GatesSpec = Field(default_factory=GatesSpec, description="Accuracy gate thresholds per variant.")
    benchmark: BenchmarkSpec = Field(default_factory=BenchmarkSpec, description="CPU benchmark settings.")
    name: str | None = Field(
        None, description="Model name to register the export under; default: the source version's model name."
    )
    classification: str | None = Field(
        None,
        description="Data classification of the exported version under the cluster's residency policy; default: "
        "the source version's. It may keep or raise the source's, never lower it.",
    )
