"""What the gate and calibration feed the model: the input signature, held-out and training rows."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlplatform._internal import artifact_layout as layout
from mlplatform.errors import HoldoutDataError, InputSignatureError

_DTYPES = {"float32": np.float32, "int64": np.int64}


@dataclass(frozen=True)
class Signature:
    """The model's single input: name, numpy dtype, shape with -1 for the batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    feature_columns: tuple[str, ...] | None

    def example(self, batch: int) -> np.ndarray:
        shape = (batch, *self.shape[1:])
        return np.zeros(shape, dtype=_DTYPES[self.dtype])


@dataclass(frozen=True)
class Holdout:
    """Gate inputs (and labels for classifiers) with where they came from."""

    x: np.ndarray
    y: np.ndarray | None
    source: str


def signature(metadata: dict[str, Any], where: str) -> Signature:
    """The input signature from an artifact's metadata, checked for what export needs.

    Raises:
        InputSignatureError: missing, more than one input, unknown dtype, or no batch axis.
    """
    example = "{names: [input], dtypes: [float32], shapes: [[-1, 64]]}"
    sig = metadata.get("input_signature")
    if not sig:
        raise InputSignatureError(
            f"{where}: metadata.json has no `input_signature`; export needs the input's name, dtype and shape "
            f"to trace the model and feed ONNX Runtime. Retrain with mlplatform.train (it writes one), or add "
            f"e.g. {example} to metadata.json and register the artifact again."
        )
    try:
        names, dtypes, shapes = list(sig["names"]), list(sig["dtypes"]), [list(s) for s in sig["shapes"]]
    except (KeyError, TypeError) as e:
        raise InputSignatureError(
            f"{where}: `input_signature` {sig!r} lacks {e}; it must hold `names`, `dtypes` and `shapes`, e.g. {example}."
        ) from None
    if not (len(names) == len(dtypes) == len(shapes) == 1):
        raise InputSignatureError(
            f"{where}: `input_signature` describes {len(names)} inputs; export supports models with exactly one "
            f"input tensor. Wrap the model so forward() takes one tensor."
        )
    dtype, shape = str(dtypes[0]), shapes[0]
    if dtype not in _DTYPES:
        raise InputSignatureError(
            f"{where}: got {dtype!r} for `input_signature.dtypes[0]`; must be one of {sorted(_DTYPES)}."
        )
    if len(shape) < 2 or shape[0] != -1 or any((not isinstance(d, int)) or d < 1 for d in shape[1:]):
        raise InputSignatureError(
            f"{where}: got {shape!r} for `input_signature.shapes[0]`; must be [-1, d1, ...] with -1 for the batch "
            f"axis and fixed positive sizes after it (an LM's sequence length is fixed at export)."
        )
    cols = sig.get("feature_columns")
    return Signature(str(names[0]), dtype, tuple(int(d) for d in shape), tuple(cols) if cols else None)


def holdout(
    metadata: dict[str, Any], artifact_dir: str | os.PathLike, sig: Signature, task: str,
    path: str | None, max_rows: int,
) -> Holdout:
    """Held-out rows: `path` if given, else the validation data in metadata, else the reference sample.

    Raises:
        HoldoutDataError: `path`, or the validation data the metadata names, is unreadable or lacks
            the model's columns (never a silent fallback to training rows: the gate would weaken).
    """
    if path:
        return _rows(_read(path, "holdout_path"), path, metadata, sig, task, max_rows)
    validation = (metadata.get("dataset") or {}).get("validation")
    if validation:
        fix = ("The accuracy gate needs the data the model was validated on: make it readable there, or pass a "
               "readable Parquet copy of it as `holdout_path` in the export spec.")
        table = _read(validation, "metadata.dataset.validation", fix)
        return _rows(table, validation, metadata, sig, task, max_rows)
    # Trained on a split of one file: no held-out file exists, so the gate checks agreement on training rows.
    sample = str(Path(artifact_dir) / layout.SAMPLE)
    return _rows(_read(sample, layout.SAMPLE), sample, metadata, sig, task, max_rows)


def calibration(artifact_dir: str | os.PathLike, metadata: dict[str, Any], sig: Signature, task: str, rows: int) -> np.ndarray:
    """Training inputs for static INT8 calibration: the artifact's reference sample (first training rows)."""
    source = str(Path(artifact_dir) / layout.SAMPLE)
    return _rows(_read(source, "calibration data (the artifact's reference sample)"), source, metadata, sig, task, rows).x


def _rows(table, source: str, metadata: dict[str, Any], sig: Signature, task: str, max_rows: int) -> Holdout:
    if task == "causal_lm":
        return Holdout(_token_blocks(table, metadata, sig, source)[:max_rows], None, source)
    label = layout.label_column(metadata)
    cols = layout.feature_columns(sig.feature_columns, table.column_names, label)
    missing = [c for c in cols if c not in table.column_names]
    if missing or len(cols) != int(np.prod(sig.shape[1:])):
        raise HoldoutDataError(
            f"{source}: has columns {table.column_names[:8]}{'...' if table.num_columns > 8 else ''}; the model needs "
            f"{int(np.prod(sig.shape[1:]))} feature columns{f' (missing {missing[:5]})' if missing else ''}. Pass a "
            f"Parquet file with the training features as `holdout_path`."
        )
    table = table.slice(0, max_rows)
    x = np.stack([np.asarray(table.column(c).to_numpy(), dtype=_DTYPES[sig.dtype]) for c in cols], axis=1)
    x = x.reshape((len(x), *sig.shape[1:]))
    y = None
    if label in table.column_names:
        y = np.asarray(table.column(label).to_numpy())
        y = y.astype(np.int64) if task == "classification" else y.astype(np.float32)
    return Holdout(x, y, source)


def _token_blocks(table, metadata: dict[str, Any], sig: Signature, source: str) -> np.ndarray:
    # The tokenizer training used (byte-level), so the gate sees the sequences the model learned from.
    column = layout.text_column(metadata)
    if column not in table.column_names:
        raise HoldoutDataError(
            f"{source}: has no text column {column!r} (columns: {table.column_names[:8]}); pass a Parquet file "
            f"with it as `holdout_path`."
        )
    seq = sig.shape[1]
    blocks = layout.token_blocks(table.column(column).to_pylist(), seq)
    if len(blocks) == 0:
        raise HoldoutDataError(f"{source}: holds fewer than {seq} tokens; the gate needs at least one full sequence.")
    return blocks


def _read(source: str, field: str, fix: str = "Pass a readable Parquet file or directory."):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(source)
    except Exception as e:  # pyarrow raises several types for missing or malformed files
        raise HoldoutDataError(f"Got {source!r} for `{field}`; cannot read it as Parquet ({e}). {fix}") from None
