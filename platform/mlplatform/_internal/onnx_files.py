"""ONNX files from outside: refuse external-data paths that leave the model's folder.

Used where a model is loaded: export (ONNX Runtime sessions) and serving.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_external_data(path: Path) -> None:
    """Raise ValueError (naming tensor, location and fix) if external-data files lie outside the model's folder.

    A tensor stored outside the .onnx file names its file by a relative `location`; one such as
    `../../etc/passwd` (or a link leading out) would read an unrelated file into the model's
    weights. ONNX Runtime refuses these too, but with an error that reads like a corrupt file.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return  # not parseable: ONNX Runtime's own error, where the caller loads it, says so
    folder = os.path.realpath(path.parent)
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = os.path.realpath(os.path.join(folder, location))
        if (not location or os.path.isabs(location) or "\0" in location
                or os.path.commonpath([folder, target]) != folder):
            raise ValueError(
                f"{path}: tensor {tensor.name!r} keeps its data in external file {location!r}, which is not a "
                f"file inside the model's folder {path.parent}. Refusing to load it: external data must be a "
                f"relative path within that folder (re-save the model with onnx.save(..., "
                f"save_as_external_data=True, location='weights.bin'))."
            )


def has_external_data(model: bytes) -> bool:
    """Whether a serialized model keeps tensors in external files (it cannot load from bytes alone)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    proto = onnx.load_from_string(model)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(proto))
