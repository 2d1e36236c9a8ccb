"""The request contract derived from a version's input signature, checked in the ingress.

A request body is `{"inputs": [[...], ...]}`: rows × features. Everything that could
make a model replica fail or misbehave is rejected here, before the batch queue:

    400 not JSON / not an object / no `inputs`      413 too many bytes or rows
    422 wrong shape, wrong type, non-finite value
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlplatform.errors import ServeError

_FLOAT = {"float32": np.float32, "float64": np.float64, "float16": np.float16}
_INT = {"int64": np.int64, "int32": np.int32}


class ContractViolation(Exception):
    """A request broke the contract: HTTP status, machine-readable code, message, field."""

    def __init__(self, status: int, code: str, message: str, field: str = "inputs"):
        super().__init__(status, code, message, field)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


@dataclass(frozen=True)
class Contract:
    """What one request may carry: a 2-D array rows × `features` of `dtype`."""

    input_name: str
    dtype: str
    features: tuple[int, ...]  # shape of one row (the signature's shape without the batch axis)
    max_rows: int
    max_payload_bytes: int

    @classmethod
    def from_signature(cls, signature: dict[str, Any] | None, max_rows: int, max_payload_bytes: int,
                       where: str = "the model") -> Contract:
        """Build from the registry's input_signature {names, dtypes, shapes}.

        Raises:
            ServeError: the signature is missing, has several inputs, or a non-batch dynamic axis.
        """
        if not signature or not signature.get("names"):
            raise ServeError(
                f"{where} has no input_signature in its registry lineage; re-register the artifact with "
                f"metadata.json `input_signature` {{names, dtypes, shapes}} so requests can be checked."
            )
        names, dtypes, shapes = signature["names"], signature.get("dtypes") or [], signature.get("shapes") or []
        if len(names) != 1 or len(dtypes) != 1 or len(shapes) != 1:
            raise ServeError(f"{where}: input_signature has {len(names)} inputs; serving supports exactly one.")
        dtype, shape = str(dtypes[0]), list(shapes[0])
        if dtype not in _FLOAT and dtype not in _INT:
            raise ServeError(f"{where}: input dtype {dtype!r} is not served; must be one of {sorted({**_FLOAT, **_INT})}.")
        features = tuple(shape[1:])
        if not shape or any((not isinstance(d, int)) or d < 1 for d in features):
            raise ServeError(
                f"{where}: input shape {shape} must be [batch, fixed sizes...] (only the first axis dynamic)."
            )
        return cls(str(names[0]), dtype, features, max_rows, max_payload_bytes)

    def describe(self) -> dict[str, Any]:
        return {
            "input": self.input_name, "dtype": self.dtype, "row_shape": list(self.features),
            "max_rows": self.max_rows, "max_payload_bytes": self.max_payload_bytes,
            "body": {"inputs": f"list of 1..{self.max_rows} rows, each of shape {list(self.features)}"},
        }

    def check_length(self, content_length: str | None) -> None:
        """Reject by the Content-Length header before reading the body."""
        if content_length is None:
            return
        try:
            n = int(content_length)
        except ValueError:
            raise ContractViolation(400, "bad_content_length", f"Content-Length {content_length!r} is not a number.",
                                    "Content-Length") from None
        if n > self.max_payload_bytes:
            raise self._too_big(n)

    def _too_big(self, n: int) -> ContractViolation:
        return ContractViolation(
            413, "payload_too_large",
            f"Body of {n} bytes exceeds the limit of {self.max_payload_bytes} bytes; split it into smaller requests.",
            "body",
        )

    def parse(self, body: bytes) -> np.ndarray:
        """The validated input array of a request body.

        Raises:
            ContractViolation: with the HTTP status and the problem named.
        """
        if len(body) > self.max_payload_bytes:
            raise self._too_big(len(body))
        try:
            # NaN/Infinity are not JSON; Python's json would accept them, so refuse them here.
            data = json.loads(body, parse_constant=_reject_constant)
        except _NonFinite as e:
            raise ContractViolation(422, "non_finite", f"{e.args[0]} is not a finite number; inputs must be finite.") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ContractViolation(400, "invalid_json", f"Body is not valid JSON ({type(e).__name__}: {_first_line(e)}).",
                                    "body") from None
        if not isinstance(data, dict):
            raise ContractViolation(400, "invalid_body", f'Body must be a JSON object {{"inputs": [...]}}; got a {_kind(data)}.',
                                    "body")
        extra = sorted(set(data) - {"inputs"})
        if extra:
            raise ContractViolation(400, "unknown_field", f"Unknown field(s) {extra}; the body takes only `inputs`.", extra[0])
        if "inputs" not in data:
            raise ContractViolation(400, "missing_inputs", 'Body has no `inputs`; send {"inputs": [[...], ...]}.')
        rows = data["inputs"]
        if not isinstance(rows, list):
            raise ContractViolation(422, "not_a_list", f"`inputs` must be a list of rows; got a {_kind(rows)}.")
        if not rows:
            raise ContractViolation(422, "empty", "`inputs` is empty; send at least one row.")
        if len(rows) > self.max_rows:
            raise ContractViolation(
                413, "too_many_rows", f"`inputs` has {len(rows)} rows; at most {self.max_rows} per request."
            )
        try:
            arr = np.asarray(rows)
        except (ValueError, TypeError, OverflowError):
            raise ContractViolation(
                422, "shape_mismatch", f"`inputs` rows must all have shape {list(self.features)} (ragged or mixed rows)."
            ) from None
        if arr.dtype.kind not in "iuf":
            # bools, strings (numpy would parse "1.5"), objects: all outside the contract.
            raise ContractViolation(
                422, "dtype_mismatch", f"`inputs` must hold only numbers for dtype {self.dtype}; found {_kind_of_array(arr)}."
            )
        if arr.shape[1:] != self.features:
            raise ContractViolation(
                422, "shape_mismatch",
                f"`inputs` has shape {list(arr.shape)}; each row must have shape {list(self.features)}.",
            )
        if self.dtype in _INT:
            if arr.dtype.kind == "f":
                raise ContractViolation(422, "dtype_mismatch", f"`inputs` must be integers for dtype {self.dtype}.")
            info = np.iinfo(_INT[self.dtype])
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ContractViolation(422, "out_of_range", f"`inputs` has values outside {self.dtype}.")
            return arr.astype(_INT[self.dtype])
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(_FLOAT[self.dtype])
        if not np.isfinite(out).all():
            bad = np.argwhere(~np.isfinite(out))[0].tolist()
            raise ContractViolation(
                422, "non_finite", f"`inputs`{bad} is not finite in {self.dtype} (overflow?); inputs must be finite."
            )
        return out


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)


def _kind(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if isinstance(x, (int, float)) else type(x).__name__
    )


def _kind_of_array(arr: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "strings", "O": "nested or mixed values"}.get(arr.dtype.kind, str(arr.dtype))


def _first_line(e: Exception) -> str:
    text = str(e)
    return text.splitlines()[0][:200] if text else ""

