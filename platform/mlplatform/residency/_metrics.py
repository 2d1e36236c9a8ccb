"""Residency metrics, counted from the audit records as the cluster's one writer appends them.

Every placement, denial and guard violation of every process reaches the audit writer
(writer.py), a detached actor on the head node that lives as long as the cluster: counting
there sees each decision once, and the counters stay exported after the deciding driver
exits. Tags are the record's kind, what asked and the classification: small sets, never
a job id, a node id or a reason text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DECISIONS = ("placement", "denial", "violation")


def count(kind: str, fields: Mapping[str, Any]) -> None:
    """Count one audit record; records of other kinds (artifact, alias, policy) are not decisions."""
    from mlplatform.observability import record

    what, classification = str(fields.get("what") or ""), str(fields.get("classification") or "")
    if kind in DECISIONS:
        record.inc("mlplatform_residency_decisions_total", 1,
                   {"kind": kind, "what": what, "classification": classification})
    elif kind == "ran":  # a finished job's sweep: how many of its actors and tasks ran inside / outside
        placements, outside = int(fields.get("placements") or 0), int(fields.get("outside") or 0)
        for outcome, n in (("inside", placements - outside), ("outside", outside)):
            if n > 0:  # Ray's Counter.inc refuses 0
                record.inc("mlplatform_residency_placements_checked_total", n,
                           {"what": what, "classification": classification, "outcome": outcome})
