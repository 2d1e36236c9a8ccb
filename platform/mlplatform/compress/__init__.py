"""Model compression for CPU serving: structured pruning + fine-tuning, and distillation, as Ray work.

    from mlplatform.compress import CompressSpec, compress_model, format_report
    report = compress_model("digits@1", CompressSpec(), root="/data/registry")
    print(format_report(report))   # per method: params before/after, gate, registered version

Each result is gated against the teacher (held-out accuracy drop, top-1 agreement) and
registered as `<teacher>-pruned` / `<teacher>-distilled` with lineage extra
{"compressed_from": "<teacher>@N", "compression": {...,"gate": {...}}}; export's `students`
turns them into serving candidates. Heavy imports (torch, ray) happen inside the functions.
"""

from mlplatform.compress._run import CompressReport, CompressResult, compress_model, format_report
from mlplatform.compress._spec import CompressSpec, DistillSpec, GateSpec, PruneSpec

__all__ = [
    "CompressReport",
    "CompressResult",
    "CompressSpec",
    "DistillSpec",
    "GateSpec",
    "PruneSpec",
    "compress_model",
    "format_report",
]
