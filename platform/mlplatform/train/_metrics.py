"""The training metrics one Ray Train worker records (catalogue: mlplatform.observability.metrics).

Per step: the step's wall time (histogram) and the samples it trained on (counter): both
outlive the worker in its node's metrics agent, so a finished run's throughput stays
queryable. Per report window: loss, learning rate, throughput, progress and peak memory
(gauges: they go ~20 s after the worker exits). Tagged by run (the spec's name) and rank.
"""

from __future__ import annotations

from typing import Any

from mlplatform.observability import record

# Report-window metrics key → gauge.
_GAUGES = {
    "loss": "mlplatform_train_loss",
    "lr": "mlplatform_train_learning_rate",
    "samples_per_s": "mlplatform_train_samples_per_second",
    "tokens_per_s": "mlplatform_train_tokens_per_second",
    "step": "mlplatform_train_step",
    "progress": "mlplatform_train_progress_ratio",
}


class TrainMetrics:
    """Records one worker's training metrics; never raises (observability.record)."""

    def __init__(self, run: str, rank: int):
        self.tags = {"run": run, "rank": str(rank)}

    def step(self, seconds: float, samples: int) -> None:
        """One optimizer step on this worker: its wall time and the samples it trained on."""
        record.observe("mlplatform_train_step_seconds", seconds, self.tags)
        record.inc("mlplatform_train_samples_total", samples, self.tags)

    def window(self, metrics: dict[str, Any], own_peak_mb: float) -> None:
        """A report window's figures (loop._metrics) and this worker's peak memory."""
        for key, name in _GAUGES.items():
            if key in metrics:
                record.set_gauge(name, metrics[key], self.tags)
        record.set_gauge("mlplatform_train_peak_memory_bytes", own_peak_mb * 2**20, self.tags)
