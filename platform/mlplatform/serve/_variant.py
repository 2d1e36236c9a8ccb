"""`variant: auto`: the fastest export-gated ONNX variant for a deployment's node class, by measurement.

The export records, per node group it benchmarked on, rows/s of every candidate at each batch
size with the CPU's flags (lineage.extra.export.benchmarks). At deploy time a deployment takes
the rows of its own node group (else the nearest: same CPU flags as this machine, then any),
at its max_batch_size (the nearest measured batch size <= it, else the smallest), and runs
the deployable variant with the highest rows/s. The reason names the numbers it chose by.

A version exported without a benchmark still deploys: auto then takes onnx_fp32 (exact, and
on CPUs without VNNI usually faster than INT8; BENCHMARKS.md) and says so, with a warning,
rather than failing a deploy over a missing measurement.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlplatform._internal import artifact_layout as layout
from mlplatform._internal.placement import Condition
from mlplatform.errors import ModelNotDeployable

logger = logging.getLogger(__name__)

NODE_GROUP_LABEL = "ray.io/node-group"
# Variants `auto` may pick (ONNX Runtime on CPU); torch stays an explicit choice (GPU).
ONNX_VARIANTS = ("onnx_fp32", "onnx_int8", "onnx_int8_qdq", "pruned_onnx_fp32", "pruned_onnx_int8",
                 "distilled_onnx_fp32", "distilled_onnx_int8")
_CPU_FLAGS = ("avx2", "avx512", "vnni", "amx")


@dataclass(frozen=True)
class Choice:
    """The variant `auto` resolved to and why (shown by `mlplatform serve status`)."""

    variant: str
    reason: str


def node_group(selector: Mapping[str, str]) -> str | None:
    """The one node group a label selector names (None when it names none, several or a negation)."""
    value = (selector or {}).get(NODE_GROUP_LABEL)
    if not value:
        return None
    cond = Condition.parse(value)
    return next(iter(cond.values)) if len(cond.values) == 1 and not cond.negated else None


def choose(export: Mapping[str, Any] | None, group: str | None, max_batch_size: int, ref: str, where: str,
           local_cpu: Mapping[str, Any] | None = None, files: set[str] | frozenset[str] = frozenset()) -> Choice:
    """The fastest deployable ONNX variant of a version for a deployment.

    Args:
        export: the version's lineage.extra.export (deployable, benchmarks).
        group: the deployment's node group (from its label selector), None if it names none.
        local_cpu: CPU flags of this machine (CpuFeatures as a dict), to find the nearest
            measurement when the group has none.
        files: the version's file names: a version registered with ONNX files but without an
            export record in its lineage (not made by `mlplatform export`) gets onnx_fp32.

    Raises:
        ModelNotDeployable: the version has no exported ONNX variant, or none passed its gate.
    """
    deployable = (export or {}).get("deployable")
    if (not isinstance(deployable, Mapping) or not deployable) and layout.ONNX_FP32 in files:
        # The replica still refuses it if the version's own export_report.json marks it not deployable.
        return _unmeasured(["onnx_fp32"], ref, f"{ref} has no export record in its lineage (registered "
                           "without `mlplatform export`)", "")
    if not isinstance(deployable, Mapping) or not deployable:
        raise ModelNotDeployable(
            f"Got 'auto' for `{where}.variant`; {ref} has no exported ONNX variants to choose from. Export it first "
            f"(`mlplatform export --model {ref} --config jobs/configs/export-digits.yaml`) and deploy the exported version."
        )
    ok = [v for v in ONNX_VARIANTS if deployable.get(v)]
    failed = sorted(v for v, passed in deployable.items() if not passed)
    if not ok:
        raise ModelNotDeployable(
            f"Got 'auto' for `{where}.variant`; every exported variant of {ref} failed its export gate "
            f"({', '.join(failed)}). Re-export with gates they pass, or deploy `variant: torch`."
        )
    gate_note = f"; {len(failed)} variant(s) failed their gate ({', '.join(failed)})" if failed else ""
    records = [b for b in (export or {}).get("benchmarks") or [] if b.get("rows")]
    record, where_note = _record(records, group, local_cpu)
    if record is None:
        return _unmeasured(ok, ref, f"{ref} was exported without a benchmark", gate_note)
    batches = sorted({int(r["batch_size"]) for r in record["rows"]})
    below = [b for b in batches if b <= max_batch_size]
    batch = below[-1] if below else batches[0]
    speed = {r["runtime"]: float(r["throughput"]) for r in record["rows"] if int(r["batch_size"]) == batch}
    measured = {v: speed[v] for v in ok if v in speed}
    if not measured:
        return _unmeasured(ok, ref, f"{ref}'s benchmark has no deployable variant at batch {batch}", gate_note)
    best = max(measured, key=measured.get)
    others = [f"{v} {_rate(t)}" for v, t in sorted(measured.items(), key=lambda kv: -kv[1]) if v != best]
    if "torch_fp32" in speed:
        others.append(f"torch_fp32 {_rate(speed['torch_fp32'])}")
    on = f"node group {record.get('node_group')}" if record.get("node_group") else "the export's own machine"
    reason = (f"{best}: {_rate(measured[best])} rows/s at batch {batch} on {on} ({_flags(record.get('cpu'))})"
              f"{', vs ' + ', '.join(others) if others else ''}{gate_note}{where_note}")
    return Choice(best, reason)


def _record(records: Sequence[Mapping[str, Any]], group: str | None,
            local_cpu: Mapping[str, Any] | None) -> tuple[Mapping[str, Any] | None, str]:
    """The benchmark record for `group`, else the nearest one and a note saying so."""
    if not records:
        return None, ""
    for r in records:
        if group is not None and r.get("node_group") == group:
            return r, ""
    wanted = _flag_set(local_cpu) if local_cpu else None
    same = [r for r in records if wanted is not None and _flag_set(r.get("cpu")) == wanted]
    pick = (same or list(records))[0]
    measured_on = f"node group {pick.get('node_group')}" if pick.get("node_group") else "the export's machine"
    basis = "same CPU flags as the node building the app" if same else "no measurement with matching CPU flags"
    return pick, (f" (no measurement on node group {group or '(none named)'}: nearest is {measured_on}, {basis}; "
                  f"export with `benchmark.node_groups: [{group or '<group>'}]` to measure there)")


def _unmeasured(ok: list[str], ref: str, why: str, gate_note: str) -> Choice:
    pick = "onnx_fp32" if "onnx_fp32" in ok else ok[0]
    reason = (f"{pick}: not chosen by measurement, {why} (re-export with `benchmark.enabled: true` to choose by "
              f"measurement); onnx_fp32 is exact and on CPUs without VNNI usually faster than INT8{gate_note}")
    logger.warning("variant auto for %s: %s", ref, reason)
    return Choice(pick, reason)


def _flag_set(cpu: Mapping[str, Any] | None) -> frozenset[str]:
    return frozenset(f for f in _CPU_FLAGS if (cpu or {}).get(f))


def _flags(cpu: Mapping[str, Any] | None) -> str:
    names = {"avx2": "AVX2", "avx512": "AVX-512", "vnni": "VNNI", "amx": "AMX"}
    return ", ".join(names[f] for f in _CPU_FLAGS if (cpu or {}).get(f)) or "no AVX2/AVX-512/VNNI/AMX"


def _rate(rows_per_s: float) -> str:
    """412k / 9.8k / 950: rows per second, short."""
    if rows_per_s >= 1e5:
        return f"{rows_per_s / 1e3:.0f}k"
    if rows_per_s >= 1e3:
        return f"{rows_per_s / 1e3:.1f}k"
    return f"{rows_per_s:.0f}"
