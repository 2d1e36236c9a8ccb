"""Training loops of compression: fine-tuning (labels) and distillation (teacher's soft targets + labels)."""

from __future__ import annotations

from typing import Any


def student(teacher_kwargs: dict[str, Any], hidden: list[int], seed: int):
    """A fresh builtin:digits_mlp with the teacher's inputs and classes and the given hidden widths."""
    import torch

    from mlplatform.train import models

    kwargs = {**models.DIGITS_MLP_DEFAULTS, **teacher_kwargs, "hidden": list(hidden)}
    torch.manual_seed(seed)  # the student's initialisation repeats
    return models.build("builtin:digits_mlp", kwargs), kwargs


def fit(model, x, y, *, epochs: int, lr: float, batch_size: int, seed: int,
        teacher=None, temperature: float = 1.0, alpha: float = 0.0):
    """Train `model` in place on numpy (x, y) with Adam; returns it in eval mode.

    With a teacher the loss is alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE
    (Hinton et al. 2015: T² keeps the soft term's gradients on the scale of the hard one's).
    """
    import torch
    from torch.nn import functional as F

    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    soft = None
    if teacher is not None:
        teacher.eval()
        with torch.no_grad():
            soft = F.log_softmax(teacher(xt) / temperature, dim=-1)  # computed once: the teacher is fixed
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch_size):
            idx = order[i : i + batch_size]
            out = model(xt[idx])
            loss = F.cross_entropy(out, yt[idx])
            if soft is not None:
                kd = F.kl_div(F.log_softmax(out / temperature, dim=-1), soft[idx], log_target=True,
                              reduction="batchmean")
                loss = alpha * temperature**2 * kd + (1 - alpha) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()
