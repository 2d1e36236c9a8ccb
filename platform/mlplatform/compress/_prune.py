"""Structured pruning of an MLP's hidden neurons, physically removed so the speedup is real.

torch.nn.utils.prune only masks weights (the matrices keep their shape and the FLOPs); here
the mask picks the surviving neurons and a smaller MLP is built from their rows and columns.
"""

from __future__ import annotations

import math
from typing import Any

from mlplatform.errors import CompressError


def linear_layers(model: Any, where: str) -> list:
    """The nn.Linear layers of a plain MLP (nn.Sequential of Linear / ReLU / Dropout), in order.

    Raises:
        CompressError: the model is not such an MLP (its neurons could not be removed safely).
    """
    from torch import nn

    allowed = (nn.Linear, nn.ReLU, nn.Dropout, nn.Identity)
    if not isinstance(model, nn.Sequential) or not all(isinstance(m, allowed) for m in model):
        kinds = sorted({type(m).__name__ for m in (model if isinstance(model, nn.Sequential) else [model])})
        raise CompressError(
            f"{where}: is a {type(model).__name__} of {kinds}; structured pruning supports MLPs built as "
            f"nn.Sequential of Linear/ReLU/Dropout (builtin:digits_mlp). Use `distill` for other models."
        )
    layers = [m for m in model if isinstance(m, nn.Linear)]
    if len(layers) < 2:
        raise CompressError(f"{where}: has {len(layers)} Linear layer(s); pruning needs at least one hidden layer.")
    return layers


def keep_indices(layer: Any, keep_ratio: float, norm: int) -> list[int]:
    """Indices of the output neurons of `layer` to keep: the largest L`norm` norms of their weight rows.

    Uses torch's own ln_structured to compute the mask (on a copy; `layer` is untouched).
    """
    import copy

    import torch
    from torch.nn.utils import prune

    out = layer.out_features
    keep = max(1, math.ceil(keep_ratio * out))
    if keep == out:
        return list(range(out))
    scratch = copy.deepcopy(layer)
    prune.ln_structured(scratch, name="weight", amount=out - keep, n=norm, dim=0)
    alive = scratch.weight_mask.abs().sum(dim=1) > 0
    idx = torch.nonzero(alive).flatten().tolist()
    if len(idx) != keep:  # ties in the norm: fall back to a stable top-k
        norms = torch.linalg.vector_norm(layer.weight.detach(), ord=norm, dim=1)
        idx = sorted(torch.topk(norms, keep).indices.tolist())
    return idx


def prune_mlp(model: Any, kwargs: dict[str, Any], keep_ratio: float, norm: int, where: str = "the teacher"):
    """A smaller copy of a builtin:digits_mlp with each hidden layer cut to `keep_ratio` of its neurons.

    Returns (pruned model, its model_kwargs, the kept indices per hidden layer). The surviving
    weights are exactly the teacher's (before any fine-tuning).
    """
    import torch

    from mlplatform.train import models

    layers = linear_layers(model, where)
    kept = [keep_indices(layer, keep_ratio, norm) for layer in layers[:-1]]
    new_kwargs = {**models.DIGITS_MLP_DEFAULTS, **kwargs, "hidden": [len(k) for k in kept]}
    small = models.build("builtin:digits_mlp", new_kwargs)
    new_layers = linear_layers(small, "the pruned model")
    with torch.no_grad():
        cols = None  # the previous layer's surviving neurons = this layer's surviving inputs
        for i, (old, new) in enumerate(zip(layers, new_layers)):
            rows = kept[i] if i < len(kept) else list(range(old.out_features))
            w = old.weight.detach()[rows]
            if cols is not None:
                w = w[:, cols]
            new.weight.copy_(w)
            new.bias.copy_(old.bias.detach()[rows])
            cols = rows
    return small.float().eval(), new_kwargs, kept


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
