"""Per-feature population stability index of live inputs against a reference sample (numpy only)."""

from __future__ import annotations

import numpy as np

_EPS = 1e-4  # floor for empty bins, so log(0) never appears


class DriftMonitor:
    """Accumulates live rows into the reference's decile bins; PSI per feature once a window fills."""

    def __init__(self, reference: np.ndarray, window_rows: int, bins: int = 10):
        reference = np.asarray(reference, dtype=np.float64)
        qs = np.linspace(0, 1, bins + 1)[1:-1]
        # Interior edges at the reference quantiles; duplicates (constant pixels) collapse bins.
        self.edges = [np.unique(np.quantile(reference[:, j], qs)) for j in range(reference.shape[1])]
        self.expected = [self._dist(reference[:, j], j) for j in range(reference.shape[1])]
        self.window_rows = window_rows
        self._counts = [np.zeros(len(e) + 1) for e in self.edges]
        self._rows = 0

    def _dist(self, column: np.ndarray, j: int) -> np.ndarray:
        counts = np.bincount(np.searchsorted(self.edges[j], column, side="right"), minlength=len(self.edges[j]) + 1)
        return np.maximum(counts / max(len(column), 1), _EPS)

    def observe(self, x: np.ndarray) -> np.ndarray | None:
        """Add rows; returns PSI per feature when a window completes (then starts a new window)."""
        x = x.reshape(len(x), -1)
        for j, edges in enumerate(self.edges):
            self._counts[j] += np.bincount(np.searchsorted(edges, x[:, j], side="right"), minlength=len(edges) + 1)
        self._rows += len(x)
        if self._rows < self.window_rows:
            return None
        psi = np.array([psi_of(self.expected[j], c / self._rows) for j, c in enumerate(self._counts)])
        self._counts = [np.zeros_like(c) for c in self._counts]
        self._rows = 0
        return psi


def psi_of(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI = Σ (a − e) · ln(a / e) over bins (both distributions floored at a small epsilon)."""
    a = np.maximum(actual, _EPS)
    e = np.maximum(expected, _EPS)
    return float(np.sum((a - e) * np.log(a / e)))
