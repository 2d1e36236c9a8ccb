"""Small trained artifacts in the training package's format, for export tests and benchmarks.

Built directly (plain torch loop, seconds) rather than through Ray Train: the export side
needs only the artifact format that mlplatform.train.artifact reads and writes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def digits_artifact(target: Path, hidden: tuple[int, ...] = (128, 64), epochs: int = 15, seed: int = 0) -> Path:
    """A digits MLP trained for a few seconds, its held-out split written beside the artifact."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from mlplatform.train import artifact, models

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # the scaling mlplatform.train.data uses
    x_tr, x_va, y_tr, y_va = train_test_split(x, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    torch.manual_seed(seed)
    kwargs = {"hidden": list(hidden)}
    model = models.build("builtin:digits_mlp", kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr.astype(np.int64))
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    cols = [f"pixel_{i}" for i in range(64)]

    def table(xs, ys=None):
        data = {c: xs[:, i] for i, c in enumerate(cols)}
        if ys is not None:
            data["label"] = ys.astype(np.int64)
        return pa.table(data)

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    validation = target.parent / f"{target.name}-validation.parquet"
    pq.write_table(table(x_va, y_va), validation)
    metrics = artifact.evaluate(model, x_va, y_va.astype(np.int64), "classification")
    metadata = {
        "model_ref": "builtin:digits_mlp",
        "model_kwargs": kwargs,
        "task": "classification",
        "spec": {"dataset": {"path": "builtin:digits", "label_column": "label"}},
        "metrics": metrics,
        "dataset_fingerprint": "sha256:test-digits",
        "dataset": {"train": None, "validation": str(validation)},
        "input_signature": {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, 64]], "feature_columns": cols},
        "output_signature": {"names": ["output"], "dtypes": ["float32"], "shapes": [[-1, -1]]},
    }
    return _write(target, model, metadata, table(x_tr[:256]))


def gpt_artifact(target: Path, kwargs: dict, steps: int = 30, seed: int = 0) -> Path:
    """The built-in GPT trained for a few steps on the built-in corpus (so logits are not ~0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mlplatform.train import data, models

    docs = data.corpus_documents()
    cut = int(len(docs) * 0.9)
    seq = kwargs["seq_len"]
    tokens = np.frombuffer("\n\n".join(docs[:cut]).encode("utf-8"), np.uint8)
    n = len(tokens) // (seq + 1)
    blocks = torch.from_numpy(tokens[: n * (seq + 1)].reshape(n, seq + 1).astype(np.int64))
    torch.manual_seed(seed)
    model = models.build("builtin:gpt", kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        b = blocks[torch.randint(0, n, (16,))]
        logits = model(b[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    validation = target.parent / f"{target.name}-validation.parquet"
    pq.write_table(pa.table({"text": docs[cut:]}), validation)
    metadata = {
        "model_ref": "builtin:gpt",
        "model_kwargs": kwargs,
        "task": "causal_lm",
        "spec": {"dataset": {"path": "builtin:tiny_corpus", "text_column": "text", "seq_len": seq}},
        "metrics": {"train_loss": loss.item()},
        "dataset_fingerprint": "sha256:test-corpus",
        "dataset": {"train": None, "validation": str(validation)},
        "input_signature": {"names": ["input_ids"], "dtypes": ["int64"], "shapes": [[-1, seq]]},
        "output_signature": {"names": ["logits"], "dtypes": ["float32"], "shapes": [[-1, seq, -1]]},
    }
    return _write(target, model, metadata, pa.table({"text": docs[:64]}))


def _write(target: Path, model, metadata: dict, sample) -> Path:
    from safetensors.torch import save_model

    from mlplatform.train import artifact

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / artifact.WEIGHTS
        save_model(model, str(weights))
        artifact.write_artifact(str(target), str(weights), metadata, sample)
    return Path(target)
