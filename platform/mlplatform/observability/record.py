"""Recording a catalogue metric without ever breaking the work it measures.

A failure (no connected Ray worker, a tag missing, a bad value) is logged once per metric and
swallowed: losing a data point is better than losing a training step or a request.

Cheap by construction: ray.util.metrics records into the process's own metric buffer
(ray._raylet's C++ stats, aggregated in-process); a background thread of the core worker
exports the aggregate to its node's metrics agent every `metrics_report_interval_ms` (10 s by
default), whatever the number of calls. So a call per training step costs no RPC.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mlplatform.observability.metrics import instrument

log = logging.getLogger("mlplatform.observability")
_warned: set[str] = set()


def inc(name: str, value: float = 1.0, tags: Mapping[str, Any] | None = None) -> None:
    """Add `value` to counter `name`."""
    _safely(name, "inc", value, tags)


def set_gauge(name: str, value: float, tags: Mapping[str, Any] | None = None) -> None:
    """Set gauge `name`."""
    _safely(name, "set", value, tags)


def observe(name: str, value: float, tags: Mapping[str, Any] | None = None) -> None:
    """Record one observation of histogram `name`."""
    _safely(name, "observe", value, tags)


def _safely(name: str, method: str, value: float, tags: Mapping[str, Any] | None) -> None:
    try:
        getattr(instrument(name), method)(float(value), tags={k: str(v) for k, v in (tags or {}).items()})
    except Exception as e:  # noqa: BLE001 - metrics must never break the work they measure
        if name not in _warned:
            _warned.add(name)
            log.warning("metric %s not recorded (%s: %s); further failures of it are not logged",
                        name, type(e).__name__, e)
