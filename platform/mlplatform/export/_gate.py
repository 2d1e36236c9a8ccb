"""Accuracy gate: each ONNX variant against the FP32 torch model on the same held-out rows."""

from __future__ import annotations

import numpy as np

from mlplatform.export._report import GateCheck, VariantReport
from mlplatform.export._spec import GateSpec

_CHUNK = 256  # rows per forward pass: bounds memory for LM logits


def evaluate(model, sessions: dict[str, object], x: np.ndarray, y: np.ndarray | None, task: str, input_name: str):
    """(torch FP32 metrics, {variant: metrics}) over every held-out row, streamed in chunks."""
    import torch

    stats = {name: _Stats() for name in sessions}
    ref_correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), _CHUNK):
            xb = x[i : i + _CHUNK]
            ref = model(torch.from_numpy(xb)).float().numpy()
            yb = None if y is None else y[i : i + _CHUNK]
            if task == "classification" and yb is not None:
                ref_correct += int((ref.argmax(-1) == yb).sum())
            for name, sess in sessions.items():
                out = sess.run(None, {input_name: xb})[0]
                stats[name].add(ref, out, yb, task)
    reference: dict[str, float] = {"rows": float(len(x))}
    if task == "classification" and y is not None:
        reference["accuracy"] = ref_correct / max(len(x), 1)
    return reference, {name: s.metrics(reference.get("accuracy")) for name, s in stats.items()}


def judge(variant: str, file: str, size: int, metrics: dict[str, float], task: str, gate: GateSpec) -> VariantReport:
    """Compare measured metrics with the variant's thresholds."""
    checks: list[GateCheck] = []
    if task == "classification":
        checks.append(_min("top1_agreement", metrics["top1_agreement"], gate.min_top1_agreement))
        if "accuracy_drop" in metrics:
            checks.append(_max("accuracy_drop", metrics["accuracy_drop"], gate.max_accuracy_drop))
    else:
        checks.append(_max("max_abs_error", metrics["max_abs_error"], gate.max_abs_error))
        checks.append(_max("mean_abs_error", metrics["mean_abs_error"], gate.max_mean_abs_error))
    return VariantReport(variant, file, size, tuple(checks), metrics)


def _min(metric: str, value: float, limit: float) -> GateCheck:
    return GateCheck(metric, float(value), float(limit), "min", bool(value >= limit))


def _max(metric: str, value: float, limit: float) -> GateCheck:
    # NaN never passes: a variant producing NaN is broken whatever the threshold.
    return GateCheck(metric, float(value), float(limit), "max", bool(value <= limit))


class _Stats:
    """Running error and agreement totals of one variant."""

    def __init__(self) -> None:
        self.rows = self.positions = self.agree = self.correct = self.values = 0
        self.abs_sum, self.abs_max = 0.0, 0.0
        self.labeled = False

    def add(self, ref: np.ndarray, out: np.ndarray, y: np.ndarray | None, task: str) -> None:
        out = np.asarray(out, dtype=np.float32).reshape(ref.shape)
        err = np.abs(out.astype(np.float64) - ref)
        worst = float(err.max()) if err.size else 0.0
        # NaN must survive max(): a variant that produces NaN fails every error threshold.
        self.abs_max = worst if np.isnan(worst) or np.isnan(self.abs_max) else max(self.abs_max, worst)
        self.abs_sum += float(err.sum())
        self.values += err.size
        self.rows += len(ref)
        if task in ("classification", "causal_lm"):
            same = ref.argmax(-1) == out.argmax(-1)  # LM: next-token positions, not sequences
            self.agree += int(same.sum())
            self.positions += same.size
        if task == "classification" and y is not None:
            self.correct += int((out.argmax(-1) == y).sum())
            self.labeled = True

    def metrics(self, ref_accuracy: float | None) -> dict[str, float]:
        m = {"max_abs_error": self.abs_max, "mean_abs_error": self.abs_sum / max(self.values, 1)}
        if self.positions:
            m["top1_agreement"] = self.agree / self.positions
        if self.labeled and ref_accuracy is not None:
            m["accuracy"] = self.correct / max(self.rows, 1)
            m["accuracy_drop"] = ref_accuracy - m["accuracy"]
        return m
