"""The gate a compressed model must pass against its teacher: accuracy kept, answers agreeing."""

from __future__ import annotations

from typing import Any


def predict(model, x):
    """Top-1 classes of a torch classifier on numpy inputs (batched, no grad)."""
    import numpy as np
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 1024):
            out.append(model(torch.from_numpy(x[i : i + 1024]).float()).argmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def judge(teacher_pred, student_pred, y, max_accuracy_drop: float, min_top1_agreement: float) -> dict[str, Any]:
    """The gate result recorded in lineage: the measured figures, the thresholds, pass/fail and why.

    The accuracy drop is rounded to 1e-9 so that float noise in equal accuracies never fails a gate.
    """
    import numpy as np

    teacher_pred, student_pred, y = np.asarray(teacher_pred), np.asarray(student_pred), np.asarray(y)
    n = len(y)
    teacher_acc = float((teacher_pred == y).mean()) if n else 0.0
    student_acc = float((student_pred == y).mean()) if n else 0.0
    agreement = float((teacher_pred == student_pred).mean()) if n else 0.0
    drop = round(teacher_acc - student_acc, 9)
    failures = []
    if n == 0:
        failures.append("the held-out data has no rows")
    if drop > max_accuracy_drop:
        failures.append(
            f"accuracy {student_acc:.4f} is {drop * 100:.2f} points below the teacher's {teacher_acc:.4f} "
            f"(allowed: {max_accuracy_drop * 100:.2f})"
        )
    if agreement < min_top1_agreement:
        failures.append(f"top-1 agreement with the teacher {agreement:.4f} is below {min_top1_agreement:.4f}")
    return {
        "passed": not failures,
        "rows": int(n),
        "teacher_accuracy": teacher_acc,
        "accuracy": student_acc,
        "accuracy_drop": drop,
        "top1_agreement": agreement,
        "max_accuracy_drop": max_accuracy_drop,
        "min_top1_agreement": min_top1_agreement,
        "failures": failures,
    }
