"""The request contract derived from a version's input signature, checked in the ingress.

A request body is `{"inputs": [[...], ...]}`: rows × features. Everything that could
make a model replica fail or misbehave is rejected here, before the batch queue:

    400 not JSON / not an object / no `inputs`      413 too many bytes or rows
    422 wrong shape, wrong type, non-finite value
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model

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

    # --- the body's type, one source for the parser and the OpenAPI schema ---

    @cached_property
    def number(self) -> Any:
        """One value of the input dtype: a strict JSON number, finite and within the dtype's range."""
        if self.dtype in _INT:
            info = np.iinfo(_INT[self.dtype])
            return Annotated[int, Field(strict=True, ge=int(info.min), le=int(info.max))]
        # The bound keeps a JSON value finite once cast (1e39 is finite in JSON, inf in float32).
        big = float(np.finfo(_FLOAT[self.dtype]).max)
        return Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-big, le=big)]

    @cached_property
    def row(self) -> Any:
        """One row: nested lists of exactly `features` numbers."""
        row = self.number
        for n in reversed(self.features):
            row = Annotated[list[row], Field(min_length=n, max_length=n)]
        return row

    @cached_property
    def rows(self) -> Any:
        return Annotated[list[self.row], Field(min_length=1, max_length=self.max_rows)]

    @cached_property
    def body_model(self) -> type[BaseModel]:
        """The body of POST /v1/predict: `{"inputs": rows}` and nothing else."""
        return create_model(
            "PredictRequest", __config__=ConfigDict(extra="forbid", strict=True),
            inputs=(self.rows, Field(description=f"1..{self.max_rows} rows, each of shape {list(self.features)} "
                                     f"({self.dtype}).")),
        )

    @cached_property
    def _body(self) -> TypeAdapter:
        return TypeAdapter(self.body_model)

    def parse(self, body: bytes) -> np.ndarray:
        """The validated input array of a request body.

        Raises:
            ContractViolation: with the HTTP status and the problem named.
        """
        if len(body) > self.max_payload_bytes:
            raise self._too_big(len(body))
        try:
            rows = self._body.validate_json(body).inputs
        except ValidationError as e:
            raise self.violation(e.errors(include_url=False, include_context=False), "inputs", ("inputs",)) from None
        return self.to_array(rows)

    def to_array(self, rows: list) -> np.ndarray:
        """Rows already validated against `rows` (or `row` items) as an array of the input dtype."""
        return np.array(rows, dtype=_INT[self.dtype] if self.dtype in _INT else _FLOAT[self.dtype])

    def violation(self, errors: list[dict[str, Any]], field: str, prefix: tuple = ()) -> ContractViolation:
        """The most important of pydantic's errors as a ContractViolation naming where and what.

        `field` names the rows in messages (`inputs`, or `inputs[0].data` for the v2 protocol);
        `prefix` is the location of the rows inside the validated document.
        """
        return min((self._one(e, field, prefix) for e in errors), key=lambda v: _RANK.get(v.code, 99))

    def _one(self, e: dict[str, Any], field: str, prefix: tuple) -> ContractViolation:
        kind, loc, value = e["type"], tuple(e["loc"]), e.get("input")
        if kind == "json_invalid":
            return ContractViolation(400, "invalid_json", f"Body is not valid JSON ({e['msg']}).", "body")
        if len(loc) < len(prefix) or loc[:len(prefix)] != prefix:
            if kind in ("model_type", "dict_type", "model_attributes_type"):
                return ContractViolation(400, "invalid_body", f'Body must be a JSON object {{"{field}": [...]}}; '
                                         f"got a {_kind(value)}.", "body")
            if kind == "extra_forbidden":
                return ContractViolation(400, "unknown_field", f"Unknown field `{loc[-1]}`; the body takes only "
                                         f"`{field}`.", str(loc[-1]))
            return ContractViolation(400, "invalid_body", f"{_where(loc)}: {e['msg']}.", _where(loc))
        at = loc[len(prefix):]  # () the rows, (i,) row i, (i, j, ...) inside row i
        where = field + "".join(f"[{i}]" for i in at)
        shape = f"[rows, {', '.join(map(str, self.features))}]"
        if kind == "missing":
            return ContractViolation(400, "missing_inputs", f'Body has no `{field}`; send {{"{field}": [[...], ...]}}.')
        if not at:
            if kind == "list_type":
                return ContractViolation(422, "not_a_list", f"`{field}` must be a list of rows; got a {_kind(value)}.")
            if kind == "too_short":
                return ContractViolation(422, "empty", f"`{field}` is empty; send at least one row.")
            if kind == "too_long" and self.features and not isinstance(value[0], list):
                # A flat row ([0.1, ...]) is a shape problem, not 64 one-number rows.
                return ContractViolation(422, "shape_mismatch", f"one row must be a list of {self.features[0]} "
                                         f"numbers; got a {_kind(value[0])} at {field}[0]; expected shape {shape}.")
            if kind == "too_long":
                return ContractViolation(413, "too_many_rows", f"`{field}` has {len(value)} rows; at most "
                                         f"{self.max_rows} per request.")
        depth = len(at) - 1  # 0: a row itself, k: k levels inside it
        if kind == "list_type" or (kind in ("float_type", "int_type") and isinstance(value, list)) or \
                kind in ("too_short", "too_long"):
            sub = list(self.features[depth:]) if depth < len(self.features) else []
            what = f"a list of {sub[0]} " + ("numbers" if len(sub) == 1 else "lists") if sub else "a number"
            got = f"a list of {len(value)} items" if isinstance(value, list) else f"a {_kind(value)}"
            one = "one row" if depth == 0 else "each item of a row"
            return ContractViolation(422, "shape_mismatch", f"{one} must be {what}; got {got} at {where}; expected "
                                     f"shape {shape}.")
        if kind in ("finite_number", "greater_than_equal", "less_than_equal"):
            return ContractViolation(422, "out_of_range" if self.dtype in _INT else "non_finite",
                                     f"`{where}` = {value!r} is " + (f"outside {self.dtype}." if self.dtype in _INT
                                     else f"not finite in {self.dtype}; inputs must be finite numbers."))
        need = "integers" if self.dtype in _INT else "numbers"
        return ContractViolation(422, "dtype_mismatch", f"`{field}` must hold only {need} for dtype {self.dtype}; "
                                 f"found a {_kind(value)} at {where}.")


# Which problem a request hears about first when it has several (the order the checks had by hand).
_RANK = {"invalid_json": 0, "invalid_body": 1, "unknown_field": 2, "missing_inputs": 3, "not_a_list": 4,
         "empty": 5, "too_many_rows": 6, "shape_mismatch": 7, "dtype_mismatch": 8, "out_of_range": 9, "non_finite": 9}


def _where(loc: tuple) -> str:
    return "body" + "".join(f"[{i}]" if isinstance(i, int) else f".{i}" for i in loc)


def _kind(x: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(x), "number" if isinstance(x, (int, float)) else type(x).__name__
    )
