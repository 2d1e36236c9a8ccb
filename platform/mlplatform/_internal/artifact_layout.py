"""What a model version holds on disk and how its inputs are made: one definition for all.

Training writes an artifact, export adds ONNX files and a report beside it, the registry
stores the directory, and serving reads it back. Each of them names the files and turns
raw columns or text into model inputs from here, so the three can never disagree.

    model.safetensors         consolidated fp32 weights (training)
    metadata.json             model_ref, model_kwargs, task, spec, metrics, input_signature, ... (training)
    reference_sample.parquet  the first training inputs (raw columns): drift reference, INT8 calibration
    model.onnx                ONNX FP32 (export)
    model.int8.onnx           ONNX INT8 (export)
    model.int8.qdq.onnx       ONNX INT8, static QDQ (export)
    model.pruned[.int8].onnx  a compressed student, FP32 / INT8 (export; also `distilled`)
    export_report.json        gates, deployable variants, benchmark (export)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

WEIGHTS = "model.safetensors"
METADATA = "metadata.json"
SAMPLE = "reference_sample.parquet"
ONNX_FP32 = "model.onnx"
ONNX_INT8 = "model.int8.onnx"
ONNX_INT8_QDQ = "model.int8.qdq.onnx"
EXPORT_REPORT = "export_report.json"
# Compressed students of the model (jobs/compress.py), exported beside it: model.<kind>.onnx and
# model.<kind>.int8.onnx, served as <kind>_onnx_fp32 / <kind>_onnx_int8.
STUDENT_KINDS = ("pruned", "distilled")
STUDENT_FILES = {f"{k}_onnx_fp32": f"model.{k}.onnx" for k in STUDENT_KINDS} | {
    f"{k}_onnx_int8": f"model.{k}.int8.onnx" for k in STUDENT_KINDS
}

# The file each servable variant runs.
VARIANT_FILES = {"onnx_int8": ONNX_INT8, "onnx_fp32": ONNX_FP32, "onnx_int8_qdq": ONNX_INT8_QDQ,
                 **STUDENT_FILES, "torch": WEIGHTS}
# Files an export adds: a re-export of an exported version replaces them.
EXPORT_FILES = frozenset({*(f for v, f in VARIANT_FILES.items() if v != "torch"), EXPORT_REPORT})

# ---- tokenizer: byte-level, so there is no vocabulary file to ship or lose.
VOCAB_SIZE = 256
DOCUMENT_SEPARATOR = "\n\n"  # documents are joined by a blank line before they are cut into blocks


def token_blocks(texts: Iterable[Any], block: int) -> np.ndarray:
    """Documents → UTF-8 bytes joined by a blank line, cut into int64 rows of `block` tokens.

    The tail shorter than one block is dropped; no rows when the text is shorter than `block`.
    """
    import numpy as np

    data = np.frombuffer(DOCUMENT_SEPARATOR.join(str(t) for t in texts).encode("utf-8"), np.uint8)
    n = len(data) // block
    return data[: n * block].reshape(n, block).astype(np.int64)


# ---- feature columns


def feature_columns(declared: Sequence[str] | None, names: Iterable[str], label: str) -> list[str]:
    """The columns a tabular model reads: those declared, else every column but the label."""
    return list(declared) if declared else [n for n in names if n != label]


def label_column(metadata: Mapping[str, Any]) -> str:
    """The label column a trained model's metadata names (`label` when it names none)."""
    return ((metadata.get("spec") or {}).get("dataset") or {}).get("label_column") or "label"


def text_column(metadata: Mapping[str, Any]) -> str:
    """The text column a language model's metadata names (`text` when it names none)."""
    return ((metadata.get("spec") or {}).get("dataset") or {}).get("text_column") or "text"


def metadata_features(metadata: Mapping[str, Any], names: Iterable[str]) -> list[str]:
    """The feature columns recorded in an artifact's input signature, else all of `names` but its label."""
    declared = (metadata.get("input_signature") or {}).get("feature_columns")
    return feature_columns(declared, names, label_column(metadata))


def input_signature(task: str, seq_len: int, columns: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(input_signature, output_signature) metadata.json records; export and serve read them back."""
    if task == "causal_lm":
        return (
            {"names": ["input_ids"], "dtypes": ["int64"], "shapes": [[-1, seq_len]]},
            {"names": ["logits"], "dtypes": ["float32"], "shapes": [[-1, seq_len, -1]]},
        )
    return (
        {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, len(columns)]], "feature_columns": list(columns)},
        {"names": ["output"], "dtypes": ["float32"], "shapes": [[-1, -1]]},
    )
