"""Built-in models (digits MLP, GPT-style decoder), model references, and their size formulas.

A model is named by a reference that the final artifact stores as is:
`builtin:<name>` or `package.module:factory`, plus the factory's kwargs. `build()` turns
a reference into an `nn.Module`; `count_params()` and `activation_bytes()` feed the
memory model without building anything big (the ≥100M config is planned, not allocated).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

from mlplatform._internal.artifact_layout import VOCAB_SIZE
from mlplatform.errors import SpecError

DIGITS_MLP_DEFAULTS: dict[str, Any] = {"in_features": 64, "hidden": [128, 64], "num_classes": 10, "dropout": 0.0}
GPT_DEFAULTS: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,  # byte-level tokens: no tokenizer to download
    "seq_len": 64,
    "d_model": 128,
    "n_layer": 5,
    "n_head": 4,
    "d_ff": None,  # 4 × d_model
    "dropout": 0.0,
    "tie_weights": True,
}


def build(ref: str, kwargs: Mapping[str, Any], activation_checkpointing: bool = False):
    """An `nn.Module` from a model reference and its kwargs.

    Raises:
        SpecError: the reference does not import, or the factory rejects the kwargs.
    """
    factory = resolve(ref)
    try:
        if ref == "builtin:gpt":
            model = factory(**kwargs, activation_checkpointing=activation_checkpointing)
        else:
            model = factory(**kwargs)
    except TypeError as e:
        raise SpecError(
            f"Got kwargs {dict(kwargs)!r} for `model.kwargs`; {ref} rejected them ({e}). "
            "Pass only arguments the factory accepts."
        ) from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise SpecError(
            f"Got {ref!r} for `model.ref`; it returned a {type(model).__name__}, not a torch.nn.Module. "
            "Point it at a factory that returns the network."
        )
    return model


def resolve(ref: str) -> Callable[..., Any]:
    """The factory a reference names (imports the module of `package.module:factory`).

    Raises:
        SpecError: unknown built-in, module not importable, or attribute missing / not callable.
    """
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name == "digits_mlp":
            return digits_mlp
        if name == "gpt":
            return gpt
        raise SpecError(f"Got {ref!r} for `model.ref`; must be builtin:digits_mlp, builtin:gpt or package.module:factory.")
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(
            f"Got {ref!r} for `model.ref`; module `{module_name}` cannot be imported ({e}). "
            "Install the package on every node (runtime_env or image) or fix the path."
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(
            f"Got {ref!r} for `model.ref`; `{module_name}` has no callable `{attr}`. "
            "Name a function or class that returns the torch.nn.Module."
        )
    return factory


# ---------------------------------------------------------------- built-ins


def digits_mlp(in_features: int = 64, hidden: list[int] = (128, 64), num_classes: int = 10, dropout: float = 0.0):
    """A small MLP for sklearn's 8×8 digits (64 pixel features, 10 classes)."""
    from torch import nn

    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def gpt(
    vocab_size: int = 256,
    seq_len: int = 64,
    d_model: int = 128,
    n_layer: int = 5,
    n_head: int = 4,
    d_ff: int | None = None,
    dropout: float = 0.0,
    tie_weights: bool = True,
    activation_checkpointing: bool = False,
):
    """A GPT-style decoder (pre-LayerNorm, causal attention, learned positions)."""
    return _gpt_class()(
        vocab_size, seq_len, d_model, n_layer, n_head, d_ff or 4 * d_model, dropout, tie_weights, activation_checkpointing
    )


_GPT = None


def _gpt_class():
    # Defined lazily so importing this module does not import torch.
    global _GPT
    if _GPT is not None:
        return _GPT
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.checkpoint import checkpoint

    class Block(nn.Module):
        def __init__(self, d: int, h: int, f: int, p: float):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.proj = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, f)
            self.fc2 = nn.Linear(f, d)
            self.h, self.p = h, p
            self.drop = nn.Dropout(p)

        def forward(self, x):
            b, s, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
            x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, s, d)))
            return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))

    class GPT(nn.Module):
        def __init__(self, vocab, seq_len, d, n_layer, h, f, p, tie, ckpt):
            super().__init__()
            if d % h:
                raise TypeError(f"d_model {d} must be divisible by n_head {h}")
            self.seq_len, self.ckpt = seq_len, ckpt
            self.tok = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(seq_len, d)
            self.drop = nn.Dropout(p)
            self.blocks = nn.ModuleList(Block(d, h, f, p) for _ in range(n_layer))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            if tie:
                self.head.weight = self.tok.weight
            self.apply(self._init)

        @staticmethod
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

        def forward(self, idx):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.drop(self.tok(idx) + self.pos(pos))
            for block in self.blocks:
                # Recompute each block in backward: keeps only block inputs alive.
                x = checkpoint(block, x, use_reentrant=False) if self.ckpt and self.training else block(x)
            return self.head(self.ln_f(x))

    _GPT = GPT
    return GPT


# ---------------------------------------------------------------- size formulas


def count_params(ref: str, kwargs: Mapping[str, Any]) -> int:
    """Trainable parameters of a model, analytically for built-ins, on the meta device otherwise."""
    if ref == "builtin:digits_mlp":
        k = {**DIGITS_MLP_DEFAULTS, **kwargs}
        widths = [k["in_features"], *k["hidden"], k["num_classes"]]
        return sum(a * b + b for a, b in zip(widths, widths[1:]))
    if ref == "builtin:gpt":
        k = {**GPT_DEFAULTS, **kwargs}
        v, s, d, n = k["vocab_size"], k["seq_len"], k["d_model"], k["n_layer"]
        f = k["d_ff"] or 4 * d
        per_layer = 4 * d * d + 2 * d * f + 9 * d + f  # qkv+proj, fc1+fc2, their biases, 2 LayerNorms
        head = 0 if k["tie_weights"] else v * d
        return v * d + s * d + n * per_layer + 2 * d + head
    import torch

    with torch.device("meta"):
        model = build(ref, kwargs)
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def activation_bytes(
    ref: str, kwargs: Mapping[str, Any], micro_batch: int, act_bytes: int, checkpointing: bool
) -> int | None:
    """Estimated activation memory of one micro batch (None: unknown for imported models).

    GPT: per layer 34·s·b·h bytes at 16-bit (Korthikanti et al. 2022, no parallelism),
    scaled by act_bytes/2. Their 5·a·s²·b attention-score term is left out: the built-in
    GPT calls scaled_dot_product_attention, whose fused kernels never hold the scores (an
    H100 run measured 0.97× this estimate, 0.45× with the term). With checkpointing only
    each layer's input (2·s·b·h) is kept plus one layer recomputed. Logits and their fp32
    softmax add s·b·V·(act+8).
    """
    b = micro_batch
    if ref == "builtin:digits_mlp":
        k = {**DIGITS_MLP_DEFAULTS, **kwargs}
        widths = [k["in_features"], *k["hidden"], k["num_classes"]]
        return 2 * b * sum(widths) * act_bytes  # pre- and post-activation per layer
    if ref == "builtin:gpt":
        k = {**GPT_DEFAULTS, **kwargs}
        s, h, n, v = k["seq_len"], k["d_model"], k["n_layer"], k["vocab_size"]
        layer = s * b * h * 34 * act_bytes / 2
        kept = n * 2 * s * b * h * act_bytes / 2 + layer if checkpointing else n * layer
        return math.ceil(kept + s * b * v * (act_bytes + 8))
    return None
