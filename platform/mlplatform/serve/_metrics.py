"""Serving metrics through ray.util.metrics: they reach Ray's Prometheus endpoint and dashboard.

Created lazily, once per replica process (ray.util.metrics needs a connected worker).
Ray's metrics agents export them with a `ray_` prefix: in Prometheus, query
`ray_mlplatform_serve_requests_total` (tests/integration/test_serve_prometheus.py checks it).

Ray 2.60 rebuilds every histogram from its bucket counts using bucket midpoints, so a
histogram's `_count` and buckets are exact but its `_sum` is an approximation. Where the sum
matters (rows predicted) there is an exact counter beside the histogram:
mean batch size = rate(rows_total) / rate(batch_rows_count).

Counters and histograms are buffered: a request adds to a local dict (well under a
microsecond) and a background task hands the totals to Ray every FLUSH_S, off the request's
path. Ray's agents export every ~10 s anyway, so a 1 s delay is invisible in Prometheus; what
a replica had buffered when it dies (at most FLUSH_S worth) is lost. Gauges are set directly:
they are set from pollers, never per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import lru_cache
from typing import Any

from mlplatform.observability import metrics as catalogue

logger = logging.getLogger("ray.serve")

FLUSH_S = 1.0

# The definitions (names, tag keys, buckets) live in the platform's one catalogue.
_SHORT = {
    "requests": "mlplatform_serve_requests_total",
    "latency": "mlplatform_serve_request_latency_ms",
    "batch_rows": "mlplatform_serve_batch_rows",
    "rows": "mlplatform_serve_rows_total",
    "fallback": "mlplatform_serve_fallback_total",
    "cache": "mlplatform_serve_cache_requests_total",
    "cache_bytes": "mlplatform_serve_cache_bytes",
    "invalid": "mlplatform_serve_invalid_requests_total",
    "replicas": "mlplatform_serve_running_replicas",
    "in_flight": "mlplatform_serve_ingress_in_flight",
    "psi": "mlplatform_serve_drift_psi",
    "drift_alert": "mlplatform_serve_drift_alert",
    "canary_state": "mlplatform_serve_canary_gate_state",
    "canary_window": "mlplatform_serve_canary_gate_window",
}


class _Buffer:
    """Every buffered counter increment and histogram observation of this process, by series.

    One lock: counters are bumped from the event loop and from model threads alike.
    """

    def __init__(self, flush_s: float = FLUSH_S):
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._counts: dict[tuple[Any, tuple], float] = {}  # (instrument, tags) → sum
        self._values: dict[tuple[Any, tuple], list[float]] = {}  # (instrument, tags) → observations
        self._last = time.monotonic()
        self._task: asyncio.Task | None = None

    def inc(self, instrument: Any, value: float, tags: dict[str, str]) -> None:
        key = (instrument, tuple(tags.items()))
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + value
        self._schedule()

    def observe(self, instrument: Any, value: float, tags: dict[str, str]) -> None:
        key = (instrument, tuple(tags.items()))
        with self._lock:
            self._values.setdefault(key, []).append(value)
        self._schedule()

    def _schedule(self) -> None:
        """Start the flusher on the running loop; without one, flush inline once FLUSH_S passed."""
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a model thread or a plain process: no loop to run a task on
            if time.monotonic() - self._last >= self.flush_s:
                self.flush()
            return
        self._task = loop.create_task(self._flusher())

    async def _flusher(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                self.flush()
        finally:  # the loop is closing (replica shutdown): hand over what is left
            self.flush()

    def flush(self) -> None:
        """Hand every buffered value to Ray now."""
        with self._lock:
            counts, self._counts = self._counts, {}
            values, self._values = self._values, {}
            self._last = time.monotonic()
        for (instrument, tags), total in counts.items():
            _safely(instrument.inc, total, dict(tags))
        for (instrument, tags), observed in values.items():
            t = dict(tags)
            for v in observed:  # ray.util.metrics has no bulk observe
                _safely(instrument.observe, v, t)


def _safely(call, value: float, tags: dict[str, str]) -> None:
    try:
        call(value, tags=tags)
    except Exception as e:  # metrics must never fail a request or the flusher
        logger.debug("metric update failed: %s", e)


class _Buffered:
    """A counter or histogram with ray.util.metrics' interface whose updates go through the buffer."""

    def __init__(self, instrument: Any, buffer: _Buffer):
        self.instrument, self._buffer = instrument, buffer

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._buffer.inc(self.instrument, value, tags or {})

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._buffer.observe(self.instrument, value, tags or {})

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.instrument.set(value, tags=tags)


@lru_cache(maxsize=1)
def buffer() -> _Buffer:
    """This process's metric buffer (flush it in tests, or before a process exits on purpose)."""
    return _Buffer()


@lru_cache(maxsize=1)
def metrics() -> dict[str, Any]:
    """Every serving metric by short name (counters and histograms buffered, see the module doc)."""
    out = {}
    for short, name in _SHORT.items():
        instrument = catalogue.instrument(name)
        kind = catalogue.BY_NAME[name].kind
        out[short] = instrument if kind == catalogue.GAUGE else _Buffered(instrument, buffer())
    return out
