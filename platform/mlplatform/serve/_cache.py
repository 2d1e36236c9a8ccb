"""Opt-in response cache of a model replica: identical requests answered without the batch queue or the model.

Only for deterministic models: the same input must always give the same output (ONNX Runtime
and torch inference on CPU are; a model that samples, or reads time or state, is not: leave the
cache off for it). Off by default (ServeSpec `primary.cache.enabled`).

Keyed per request, not per row: the key is sha256 over the model version, the variant and the
input array's dtype, shape and bytes, so a hit needs the same rows in the same order. Per-row
keys would hit more often for overlapping requests but cost a hash and a split/reassembly per
row on every request, hit or miss; clients that repeat requests (retries, polling dashboards,
popular items) repeat them whole. The replica serves one version and variant, and both are in
the key anyway, so a cache can never answer for another model.

Memory is bounded in bytes (outputs + keys + a fixed per-entry overhead), least recently used
entries evicted first. One replica's cache is its own: hit rates fall as replicas are added.
A hit reaches neither the model nor drift monitoring nor mlplatform_serve_rows_total (nothing
ran); it counts in mlplatform_serve_cache_requests_total{result="hit"} and answers with
X-Batch-Rows 0.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

# Per entry beyond the output's bytes: the dict slot, the key string, the ndarray header.
ENTRY_OVERHEAD = 200


class ResponseCache:
    """A bytes-bounded LRU map from request key to output array, with hit/miss counts."""

    def __init__(self, max_bytes: int, version: str, variant: str):
        self.max_bytes = int(max_bytes)
        self._prefix = hashlib.sha256(f"{version}\0{variant}\0".encode())
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the event loop and model threads may both touch it
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def key(self, x: np.ndarray) -> str:
        """The request's key: version, variant, dtype, shape and bytes of the input."""
        h = self._prefix.copy()
        h.update(f"{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).data)
        return h.hexdigest()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            out = self._entries.get(key)
            if out is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return out

    def put(self, key: str, out: np.ndarray) -> None:
        """Keep `out` (read-only, so no caller can change a cached answer); an entry larger than the
        whole budget is not kept."""
        size = _size(out)
        if size > self.max_bytes:
            return
        out = np.array(out, copy=True)
        out.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= _size(old)
            self._entries[key] = out
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= _size(evicted)

    def __len__(self) -> int:
        return len(self._entries)


def _size(out: np.ndarray) -> int:
    return int(out.nbytes) + 64 + ENTRY_OVERHEAD  # 64: the hex key
