"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) over the platform's request contract.

The model name is the Serve application's name, its version the registry version number
("digits@2" → "2"). One input tensor (the signature's input, shape [-1, *row]); a
classifier answers `logits` FP32 [N, C], `probabilities` FP32 [N, C] and `class` INT64 [N],
any other model `output`. Tensor data is JSON (flat row-major or nested, as the spec allows) or,
with the `Inference-Header-Content-Length` header, the binary tensor data extension that
tritonclient uses by default. Refusals are `{"error": "..."}`, as the protocol has them.

What is checked here is what the OpenAPI schema built by `infer_request_schema` states, so a
schema-valid JSON request is served and a schema-invalid one is refused with a 4xx.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mlplatform.serve._contract import Contract, ContractViolation

DATATYPES = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64", "int32": "INT32"}
_NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}
HEADER_LENGTH = "inference-header-content-length"
CLASSIFIER_OUTPUTS = ("logits", "probabilities", "class")


def version_number(ref: str | None) -> str | None:
    """The protocol's model version of a registry ref: "digits@2" → "2"."""
    return ref.rsplit("@", 1)[-1] if ref else None


def error(e: ContractViolation) -> dict[str, str]:
    """The protocol's error body: one message naming what is wrong and how to fix it."""
    return {"error": e.message}


def server_metadata() -> dict[str, Any]:
    from mlplatform import __version__

    return {"name": "mlplatform", "version": __version__, "extensions": ["binary_tensor_data"]}


@dataclass(frozen=True)
class Outputs:
    """What the model answers, learned from one of its answers: classifier or raw outputs."""

    classifier: bool
    width: tuple[int, ...]  # the output's shape without the batch axis
    datatype: str

    @classmethod
    def of(cls, result: dict[str, Any]) -> Outputs:
        out = np.asarray(result["outputs"])
        classifier = result.get("task") == "classification" and out.ndim == 2
        return cls(classifier, tuple(out.shape[1:]), DATATYPES.get(str(out.dtype), "FP32"))

    def names(self) -> tuple[str, ...]:
        return CLASSIFIER_OUTPUTS if self.classifier else ("output",)

    def describe(self) -> list[dict[str, Any]]:
        if self.classifier:
            return [{"name": "logits", "datatype": "FP32", "shape": [-1, *self.width]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, *self.width]},
                    {"name": "class", "datatype": "INT64", "shape": [-1]}]
        return [{"name": "output", "datatype": self.datatype, "shape": [-1, *self.width]}]


def model_metadata(app: str, versions: list[str], contract: Contract, outputs: Outputs) -> dict[str, Any]:
    return {
        "name": app, "versions": versions, "platform": "mlplatform",
        "inputs": [{"name": contract.input_name, "datatype": DATATYPES[contract.dtype],
                    "shape": [-1, *contract.features]}],
        "outputs": outputs.describe(),
    }


# --- the request ---

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# Optional fields may be omitted but not null (as the published schema says): a default that is
# not of the field's type is never validated, so an explicit null is refused.
class _OutputParameters(_Strict):
    binary_data: bool = False


class _RequestedOutput(_Strict):
    name: str
    parameters: _OutputParameters = None


class _InputParameters(_Strict):
    binary_data_size: Annotated[int, Field(ge=0)] = None


class _Tensor(_Strict):
    name: str
    shape: list[int]
    datatype: str
    data: Any = None
    parameters: _InputParameters = None


class _RequestParameters(BaseModel):
    # Other request parameters (priority, timeout, ...) are accepted and have no effect here.
    model_config = ConfigDict(extra="allow", strict=True)
    binary_data_output: bool = False


class _InferBody(_Strict):
    id: str = None
    parameters: _RequestParameters = None
    inputs: Annotated[list[_Tensor], Field(min_length=1)]
    outputs: list[_RequestedOutput] = None


_BODY = TypeAdapter(_InferBody)


@dataclass
class InferRequest:
    """A checked infer request: the input rows, the id to echo, which outputs and how."""

    x: np.ndarray
    id: str | None = None
    outputs: list[str] | None = None  # None: every output
    binary: dict[str, bool] = field(default_factory=dict)
    binary_default: bool = False


def parse_infer(body: bytes, header_length: str | None, contract: Contract) -> InferRequest:
    """The validated request of POST /v2/models/{name}/infer.

    Raises:
        ContractViolation: with the HTTP status and the problem named.
    """
    if len(body) > contract.max_payload_bytes:
        raise contract._too_big(len(body))
    blob = b""
    if header_length is not None:  # binary tensor data extension: a JSON header, then raw tensors
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise ContractViolation(400, "bad_header_length", f"Inference-Header-Content-Length {header_length!r} "
                                    f"must be the byte length of the JSON header (0..{len(body)}).",
                                    "Inference-Header-Content-Length")
        body, blob = body[:n], body[n:]
    try:
        req = _BODY.validate_json(body)
    except ValidationError as e:
        raise _request_error(e.errors(include_url=False, include_context=False)[0]) from None
    if len(req.inputs) != 1 or req.inputs[0].name != contract.input_name:
        names = [t.name for t in req.inputs]
        raise ContractViolation(400, "unknown_input", f"The request has inputs {names}; this model takes exactly one, "
                                f"{contract.input_name!r} (see GET /v2/models/{{name}}).")
    tensor = req.inputs[0]
    x = _tensor(tensor, blob if header_length is not None else None, contract)
    binary = {o.name: bool(o.parameters and o.parameters.binary_data) for o in req.outputs or []}
    return InferRequest(x, req.id, [o.name for o in req.outputs] if req.outputs is not None else None, binary,
                        bool(req.parameters and req.parameters.binary_data_output))


def _tensor(t: _Tensor, blob: bytes | None, contract: Contract) -> np.ndarray:
    where = f"inputs[0] ({t.name!r})"
    want = DATATYPES[contract.dtype]
    if t.datatype != want:
        raise ContractViolation(400, "dtype_mismatch", f"{where} has datatype {t.datatype!r}; this model takes {want}.")
    features, shape = list(contract.features), f"[rows, {', '.join(map(str, contract.features))}]"
    if len(t.shape) != 1 + len(features) or t.shape[1:] != features or t.shape[0] < 1:
        raise ContractViolation(422, "shape_mismatch", f"{where} has shape {t.shape}; expected {shape} with 1.."
                                f"{contract.max_rows} rows.")
    rows = t.shape[0]
    if rows > contract.max_rows:
        raise ContractViolation(413, "too_many_rows", f"{where} has {rows} rows; at most {contract.max_rows} per "
                                "request.")
    size = rows * math.prod(features)
    size_param = t.parameters.binary_data_size if t.parameters else None
    if blob is not None and size_param is not None:
        if t.data is not None:
            raise ContractViolation(400, "invalid_body", f"{where} has both `data` and binary_data_size; send one.")
        return _binary(blob, size_param, size, t.shape, contract, where)
    if blob is None and t.parameters is not None:
        raise ContractViolation(400, "unknown_field", f"{where} has `parameters`; without the binary tensor data "
                                "extension (Inference-Header-Content-Length) a JSON tensor takes none.", "parameters")
    if t.data is None:
        raise ContractViolation(400, "missing_data", f"{where} has no `data`.")
    if not isinstance(t.data, list) or not t.data:
        raise ContractViolation(422, "not_a_list", f"{where} `data` must be a non-empty list of numbers (flat, "
                                f"row-major) or of rows; got a {type(t.data).__name__}.")
    name = "inputs[0].data"
    if isinstance(t.data[0], list):  # nested: rows of the row shape
        try:
            data = TypeAdapter(contract.rows).validate_python(t.data, strict=True)
        except ValidationError as e:
            raise contract.violation(e.errors(include_url=False, include_context=False), name) from None
        if len(data) != rows:
            raise ContractViolation(422, "shape_mismatch", f"{name} has {len(data)} rows; `shape` says {rows}.")
        return contract.to_array(data)
    try:
        flat = _flat(contract).validate_python(t.data, strict=True)
    except ValidationError as e:
        raise contract.violation(e.errors(include_url=False, include_context=False), name) from None
    if len(flat) != size:
        raise ContractViolation(422, "shape_mismatch", f"{name} has {len(flat)} values; shape {t.shape} needs {size}.")
    return contract.to_array(flat).reshape(t.shape)


def _flat(contract: Contract) -> TypeAdapter:
    return TypeAdapter(list[contract.number])


def _binary(blob: bytes, nbytes: int, size: int, shape: list[int], contract: Contract, where: str) -> np.ndarray:
    dtype = np.dtype(_NUMPY[DATATYPES[contract.dtype]]).newbyteorder("<")  # the extension is little-endian
    if nbytes != size * dtype.itemsize or len(blob) != nbytes:
        raise ContractViolation(422, "shape_mismatch", f"{where} carries {len(blob)} bytes (binary_data_size "
                                f"{nbytes}); shape {shape} of {DATATYPES[contract.dtype]} needs {size * dtype.itemsize}.")
    x = np.frombuffer(blob, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise ContractViolation(422, "non_finite", f"{where}{bad} is not finite; inputs must be finite numbers.")
    return x


def _request_error(e: dict[str, Any]) -> ContractViolation:
    loc = "".join(f"[{i}]" if isinstance(i, int) else f".{i}" for i in e["loc"]).lstrip(".")
    if e["type"] == "json_invalid":
        return ContractViolation(400, "invalid_json", f"Body is not valid JSON ({e['msg']}).", "body")
    if e["type"] in ("model_type", "dict_type") and not e["loc"]:
        return ContractViolation(400, "invalid_body", 'Body must be a JSON object {"inputs": [{"name", "shape", '
                                 '"datatype", "data"}]}.', "body")
    if e["type"] == "extra_forbidden":
        return ContractViolation(400, "unknown_field", f"Unknown field `{loc}`.", loc)
    if e["type"] == "missing":
        return ContractViolation(400, "missing_field", f"`{loc}` is required.", loc)
    return ContractViolation(400, "invalid_body", f"`{loc or 'body'}`: {e['msg']}.", loc or "body")


# --- the response ---

def infer_response(req: InferRequest, result: dict[str, Any], outputs: Outputs, app: str,
                   version: str) -> tuple[bytes, dict[str, str], str]:
    """(body, headers, media type) of an infer answer: JSON, or JSON header + binary tensors when asked.

    Raises:
        ContractViolation: an output was asked for that this model does not have.
    """
    names = req.outputs if req.outputs is not None else list(outputs.names())
    unknown = [n for n in names if n not in outputs.names()]
    if unknown:
        raise ContractViolation(400, "unknown_output", f"No output {unknown[0]!r}; this model answers "
                                f"{list(outputs.names())}.", "outputs")
    raw = np.asarray(result["outputs"])
    tensors = {}
    for name in names:
        if name == "logits" or name == "output":
            tensors[name] = raw.astype(np.float32) if name == "logits" else raw
        elif name == "probabilities":
            z = raw.astype(np.float32) - raw.max(axis=1, keepdims=True)
            e = np.exp(z)
            tensors[name] = e / e.sum(axis=1, keepdims=True)
        else:
            tensors[name] = raw.argmax(axis=1).astype(np.int64)
    body: dict[str, Any] = {"model_name": app, "model_version": version, "outputs": []}
    if req.id is not None:
        body["id"] = req.id
    chunks = []
    for name, t in tensors.items():
        out = {"name": name, "datatype": DATATYPES.get(str(t.dtype), "FP32"), "shape": list(t.shape)}
        if req.binary.get(name, req.binary_default):
            data = np.ascontiguousarray(t, dtype=t.dtype.newbyteorder("<")).tobytes()
            out["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            out["data"] = json_values(t.reshape(-1))
        body["outputs"].append(out)
    header = json.dumps(body).encode()
    if not chunks:
        return header, {}, "application/json"
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header))}, "application/octet-stream"


def json_values(a: np.ndarray) -> list:
    """Values for JSON: a non-finite one (a model overflowing on extreme but valid inputs) is null,
    as JSON has no NaN or Infinity (what JavaScript's JSON.stringify does too)."""
    if a.dtype.kind != "f" or np.isfinite(a).all():
        return a.tolist()
    return np.where(np.isfinite(a), a, None).tolist()


# --- the OpenAPI schema: exactly what parse_infer accepts as JSON ---

def infer_request_schema(contract: Contract, outputs: Outputs) -> dict[str, Any]:
    """JSON schema of the infer body. `shape` and `data` agree per row count (one branch per count:
    JSON Schema cannot relate an array's length to another field's value otherwise)."""
    number = TypeAdapter(contract.number).json_schema()
    row = TypeAdapter(contract.row).json_schema()
    per_row = math.prod(contract.features)
    branches = [{
        "properties": {
            "shape": {"const": [n, *contract.features]},
            "data": {"anyOf": [
                {"type": "array", "items": number, "minItems": n * per_row, "maxItems": n * per_row},
                {"type": "array", "items": row, "minItems": n, "maxItems": n},
            ]},
        },
    } for n in range(1, contract.max_rows + 1)]
    tensor = {
        "type": "object", "additionalProperties": False, "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string", "enum": [contract.input_name]},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string", "enum": [DATATYPES[contract.dtype]]},
            "data": {"type": "array"},
        },
        "anyOf": branches,
    }
    requested = {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": list(outputs.names())},
            "parameters": {"type": "object", "additionalProperties": False,
                           "properties": {"binary_data": {"type": "boolean", "description": "Answer this output "
                                                          "as binary tensor data."}}},
        },
    }
    return {
        "type": "object", "additionalProperties": False, "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "Echoed in the answer."},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}},
                           "description": "binary_data_output: answer every output as binary tensor data."},
            "inputs": {"type": "array", "items": tensor, "minItems": 1, "maxItems": 1},
            "outputs": {"type": "array", "items": requested,
                        "description": "Which outputs to answer (default: all)."},
        },
    }


def openapi(base: dict[str, Any], contract: Contract, outputs: Outputs, app: str, versions: list[str],
            root_path: str = "") -> dict[str, Any]:
    """The app's OpenAPI schema: FastAPI's routes and responses, with the request bodies and path
    parameters this app (its signature, limits and versions) accepts, exactly."""
    import copy

    schema = copy.deepcopy(base)
    if root_path:
        schema["servers"] = [{"url": root_path}]
    for path, item in schema.get("paths", {}).items():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] == "model_name":
                    param["schema"] = {"type": "string", "enum": [app], "title": "Model Name"}
                elif param["name"] == "model_version":
                    param["schema"] = {"type": "string", "enum": versions, "title": "Model Version"}
            body = (contract.body_model.model_json_schema() if path == "/v1/predict"
                    else infer_request_schema(contract, outputs) if path.endswith("/infer") else None)
            if body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return schema


# --- documented answers (FastAPI puts them in the OpenAPI schema) ---

class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong and how to fix it.")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str = Field(description="The Serve application's name.")
    versions: list[str] = Field(description="Registry version numbers this application serves.")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | None] | None = Field(None, description="Row-major values (null: not finite, the model "
                                            "overflowed); absent when sent as binary data.")
    parameters: dict[str, int] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="The request's id, when it had one.")
    outputs: list[OutputTensor]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    name: str | None = None
