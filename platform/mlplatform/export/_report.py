"""Frozen records of an export (gates, benchmark, CPU) and their JSON / text forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

REPORT_FORMAT = 1


@dataclass(frozen=True)
class CpuFeatures:
    """What the benchmark ran on: model name, logical CPUs and the SIMD sets INT8 speed depends on."""

    model: str
    logical_cpus: int
    avx2: bool
    avx512: bool  # avx512f
    vnni: bool  # avx512_vnni or avx_vnni: 8-bit dot products without u8×s8 saturation
    amx: bool  # amx_int8

    def summary(self) -> str:
        sets = [n for n, on in (("AVX2", self.avx2), ("AVX-512", self.avx512), ("VNNI", self.vnni), ("AMX", self.amx)) if on]
        return f"{self.model} ({self.logical_cpus} logical CPUs; {', '.join(sets) or 'no AVX2/AVX-512/VNNI'})"


@dataclass(frozen=True)
class GateCheck:
    """One threshold: the measured value, the limit, and by how much it missed."""

    metric: str
    value: float
    limit: float
    kind: str  # "min": value must be >= limit; "max": value must be <= limit
    passed: bool

    @property
    def shortfall(self) -> float:
        """How far past the limit the value is (0 when passed)."""
        if self.passed:
            return 0.0
        return self.limit - self.value if self.kind == "min" else self.value - self.limit

    def describe(self) -> str:
        if self.kind == "min":
            rel = ">=" if self.passed else "<"
            tail = "" if self.passed else f", short by {_num(self.shortfall)}"
            return f"{self.metric} {_num(self.value)} {rel} {_num(self.limit)} required{tail}"
        rel = "<=" if self.passed else ">"
        tail = "" if self.passed else f", over by {_num(self.shortfall)}"
        return f"{self.metric} {_num(self.value)} {rel} {_num(self.limit)} allowed{tail}"


@dataclass(frozen=True)
class VariantReport:
    """One exported variant: its file, size, gate result and whether serving may deploy it."""

    variant: str  # "onnx_fp32" or "onnx_int8"
    file: str
    size_bytes: int
    checks: tuple[GateCheck, ...]
    metrics: dict[str, float] = field(default_factory=dict)  # everything measured, gated or not

    @property
    def deployable(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [c.describe() for c in self.checks if not c.passed]


@dataclass(frozen=True)
class BenchmarkRow:
    """Latency and throughput of one runtime at one batch size."""

    runtime: str  # "torch_fp32", "onnx_fp32", "onnx_int8"
    batch_size: int
    p50_ms: float
    p99_ms: float
    throughput: float  # samples (LM: sequences) per second
    runs: int


@dataclass(frozen=True)
class ExportReport:
    """Everything one export measured; stored as export_report.json with the version."""

    source_ref: str | None  # registry version exported, e.g. "digits@1" (None: a bare artifact)
    version_ref: str | None  # the version registered with the ONNX files (None: not registered)
    model_ref: str
    task: str
    opset: int
    quantization: str | None  # "dynamic", "static" or None (quantize: none)
    holdout: dict[str, Any]  # source, rows, labeled
    reference_metrics: dict[str, float]  # torch FP32 on the held-out data
    variants: tuple[VariantReport, ...]
    benchmark: tuple[BenchmarkRow, ...]
    threads: int
    cpu: CpuFeatures
    torch_version: str
    onnxruntime_version: str
    created_at: str

    @property
    def deployable(self) -> dict[str, bool]:
        return {v.variant: v.deployable for v in self.variants}

    def variant(self, name: str) -> VariantReport:
        for v in self.variants:
            if v.variant == name:
                return v
        raise KeyError(f"no variant {name!r}; have {[v.variant for v in self.variants]}")

    def speedup(self, runtime: str, batch_size: int, baseline: str = "torch_fp32") -> float | None:
        """Throughput of `runtime` over `baseline` at one batch size (None if not measured)."""
        rows = {(r.runtime, r.batch_size): r.throughput for r in self.benchmark}
        a, b = rows.get((runtime, batch_size)), rows.get((baseline, batch_size))
        return a / b if a and b else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for v, raw in zip(self.variants, data["variants"]):
            raw["deployable"] = v.deployable
            raw["failures"] = v.failures()
        return {"format": REPORT_FORMAT, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportReport:
        data = {k: v for k, v in data.items() if k != "format"}
        variants = tuple(
            VariantReport(
                variant=v["variant"], file=v["file"], size_bytes=v["size_bytes"],
                checks=tuple(GateCheck(**c) for c in v["checks"]), metrics=v.get("metrics", {}),
            )
            for v in data.pop("variants")
        )
        bench = tuple(BenchmarkRow(**r) for r in data.pop("benchmark"))
        return cls(**{**data, "variants": variants, "benchmark": bench, "cpu": CpuFeatures(**data.pop("cpu"))})

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"


def format_report(report: ExportReport) -> str:
    """A human-readable summary: gates with shortfalls, deployable flags, benchmark table."""
    lines = [
        f"Export of {report.source_ref or report.model_ref} ({report.task}, opset {report.opset}"
        f"{', INT8 ' + report.quantization if report.quantization else ''})"
        + (f" → registered as {report.version_ref}" if report.version_ref else ""),
        f"Held-out data: {report.holdout.get('rows')} rows from {report.holdout.get('source')}"
        + ("" if report.holdout.get("labeled") or report.task != "classification" else " (unlabeled: agreement only)"),
    ]
    if report.reference_metrics:
        lines.append("torch FP32: " + ", ".join(f"{k} {_num(v)}" for k, v in report.reference_metrics.items()))
    for v in report.variants:
        state = "DEPLOYABLE" if v.deployable else "NOT DEPLOYABLE"
        lines.append(f"{v.variant:<10} {state:<15} {v.file} ({v.size_bytes / 1e6:.2f} MB)")
        for c in v.checks:
            lines.append(f"    {'ok  ' if c.passed else 'FAIL'} {c.describe()}")
    if report.benchmark:
        lines.append(f"Benchmark ({report.threads} threads, {report.cpu.summary()}):")
        lines.append(f"    {'runtime':<11} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'samples/s':>11} {'vs torch':>8}")
        for r in report.benchmark:
            s = report.speedup(r.runtime, r.batch_size)
            lines.append(
                f"    {r.runtime:<11} {r.batch_size:>5} {r.p50_ms:>9.3f} {r.p99_ms:>9.3f} {r.throughput:>11.1f} "
                f"{(f'{s:.2f}x' if s else '-'):>8}"
            )
    return "\n".join(lines)


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"
