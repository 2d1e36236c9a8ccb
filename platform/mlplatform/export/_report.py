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

    variant: str  # "onnx_fp32", "onnx_int8", "onnx_int8_qdq", "pruned_onnx_fp32", ...
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

    runtime: str  # "torch_fp32" or a variant name ("onnx_fp32", "onnx_int8", ...)
    batch_size: int
    p50_ms: float
    p99_ms: float
    throughput: float  # samples (LM: sequences) per second
    runs: int


@dataclass(frozen=True)
class NodeBenchmark:
    """Every runtime timed on one node: its node group (None: where the export ran, off Ray), its CPU, the rows."""

    node_group: str | None
    cpu: CpuFeatures
    threads: int
    rows: tuple[BenchmarkRow, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeBenchmark:
        return cls(data.get("node_group"), CpuFeatures(**data["cpu"]), int(data["threads"]),
                   tuple(BenchmarkRow(**r) for r in data.get("rows") or ()))


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
    # One record per node the benchmark ran on (`benchmark` above is the first one's rows).
    benchmarks: tuple[NodeBenchmark, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)  # candidate → why it was not built

    @property
    def deployable(self) -> dict[str, bool]:
        return {v.variant: v.deployable for v in self.variants}

    @property
    def passed(self) -> bool:
        """Every variant of the model itself passed its gate; a failed student only loses its own candidates."""
        return all(ok for v, ok in self.deployable.items() if not v.startswith(("pruned_", "distilled_")))

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
        nodes = tuple(NodeBenchmark.from_json(b) for b in data.pop("benchmarks", ()) or ())
        return cls(**{**data, "variants": variants, "benchmark": bench, "benchmarks": nodes,
                      "cpu": CpuFeatures(**data.pop("cpu"))})

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
        lines.append(f"{v.variant:<19} {state:<15} {v.file} ({v.size_bytes / 1e6:.2f} MB)")
        for c in v.checks:
            lines.append(f"    {'ok  ' if c.passed else 'FAIL'} {c.describe()}")
    for name, why in report.skipped.items():
        lines.append(f"{name:<19} {'NOT BUILT':<15} {why}")
    nodes = report.benchmarks or ((NodeBenchmark(None, report.cpu, report.threads, report.benchmark),)
                                  if report.benchmark else ())
    for node in nodes:
        where = f"node group {node.node_group}" if node.node_group else "this process"
        lines.append(f"Benchmark on {where} ({node.threads} threads, {node.cpu.summary()}):")
        lines.append(f"    {'runtime':<19} {'batch':>5} {'p50 ms':>9} {'p99 ms':>9} {'samples/s':>11} {'vs torch':>8}")
        base = {r.batch_size: r.throughput for r in node.rows if r.runtime == "torch_fp32"}
        for r in node.rows:
            s = r.throughput / base[r.batch_size] if base.get(r.batch_size) else None
            lines.append(
                f"    {r.runtime:<19} {r.batch_size:>5} {r.p50_ms:>9.3f} {r.p99_ms:>9.3f} {r.throughput:>11.1f} "
                f"{(f'{s:.2f}x' if s else '-'):>8}"
            )
    return "\n".join(lines)


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"
