"""The Open Inference Protocol v2 layer and the published schemas, without Ray: the JSON schema
each endpoint publishes accepts exactly the bodies the app accepts; tritonclient's own request
and response encodings (JSON and binary tensor data) go through unchanged."""

import json

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.serve import _v2
from mlplatform.serve._contract import Contract, ContractViolation

C = Contract.from_signature({"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, 4]]}, max_rows=3,
                            max_payload_bytes=100_000)
CLASSIFIER = _v2.Outputs(True, (3,), "FP32")
_value = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-10**40, 10**40), st.booleans(),
                   st.none(), st.text(max_size=2), st.sampled_from([3.4028234663852886e38, 3.5e38, -1e39, 1e-45]))
_row = st.lists(_value, min_size=3, max_size=5) | _value
_rows = st.lists(_row, min_size=0, max_size=4) | _value


def accepted(parse, body: bytes) -> bool:
    try:
        parse(body)
    except ContractViolation as e:
        assert 400 <= e.status < 500 and e.message
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(rows=_rows, extra=st.booleans())
def test_v1_schema_accepts_exactly_what_the_contract_accepts(rows, extra):
    body = {"inputs": rows, **({"x": 1} if extra else {})}
    valid = jsonschema.Draft202012Validator(C.body_model.model_json_schema()).is_valid(body)
    assert valid == accepted(C.parse, json.dumps(body).encode()), body


_tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "x"]), "datatype": st.sampled_from(["FP32", "FP32", "INT64"]),
     "shape": st.lists(st.integers(0, 4), min_size=1, max_size=3) | st.sampled_from([[1, 4], [2, 4], [3, 4]])},
    optional={"data": st.lists(_value, min_size=0, max_size=12) | _rows, "parameters": st.just({})},
)
_body = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor, min_size=0, max_size=2)},
    optional={"id": st.text(max_size=3) | st.integers(), "parameters": st.just({"priority": 1}),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["class", "logits", "other"])},
                                                        optional={"parameters": st.just({"binary_data": False})}),
                                  max_size=3)},
)


@settings(max_examples=600, deadline=None)
@given(body=_body)
def test_v2_schema_accepts_exactly_what_the_protocol_accepts(body):
    schema = _v2.infer_request_schema(C, CLASSIFIER)
    valid = jsonschema.Draft202012Validator(schema).is_valid(body)
    raw = json.dumps(body).encode()

    def parse_and_answer(b):  # an unknown output is found once the model answered; a 400 all the same
        req = _v2.parse_infer(b, None, C)
        _v2.infer_response(req, {"outputs": np.zeros((len(req.x), 3), np.float32), "task": "classification"},
                           CLASSIFIER, "digits", "1")

    assert valid == accepted(parse_and_answer, raw), body


def test_flat_and_nested_data_and_protocol_errors():
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for data in (x.ravel().tolist(), x.tolist()):
        body = json.dumps({"inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": data}]})
        np.testing.assert_array_equal(_v2.parse_infer(body.encode(), None, C).x, x)
    with pytest.raises(ContractViolation, match=r"has shape \[2, 5\]; expected \[rows, 4\]") as e:
        _v2.parse_infer(json.dumps({"inputs": [{"name": "input", "shape": [2, 5], "datatype": "FP32",
                                                "data": [0] * 10}]}).encode(), None, C)
    assert e.value.status == 422 and _v2.error(e.value) == {"error": e.value.message}
    with pytest.raises(ContractViolation, match="exactly one, 'input'"):
        _v2.parse_infer(b'{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0,0,0,0]}]}',
                        None, C)


def test_flat_row_on_v1_is_a_422_with_the_expected_shape():
    with pytest.raises(ContractViolation) as e:
        C.parse(b'{"inputs": [0.1, 0.2, 0.3, 0.4]}')
    assert (e.value.status, e.value.message) == (
        422, "one row must be a list of 4 numbers; got a number at inputs[0]; expected shape [rows, 4].")


class _Wire:
    """tritonclient's view of an HTTP response (headers by name, body by read)."""

    def __init__(self, body: bytes, headers: dict[str, str]):
        self.body, self.headers = body, headers

    def get(self, name, default=None):
        return self.headers.get(name, default)

    def read(self, length=-1):
        out, self.body = (self.body, b"") if length == -1 else (self.body[:length], self.body[length:])
        return out


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_encodings_round_trip(binary):
    import tritonclient.http as triton
    from tritonclient.http._infer_result import InferResult
    from tritonclient.http._utils import _get_inference_request

    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    tensor = triton.InferInput("input", [3, 4], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "class")]
    body, header = _get_inference_request([tensor], "7", outputs, 0, False, False, 0, None, None)
    req = _v2.parse_infer(body, None if header is None else str(header), C)
    np.testing.assert_array_equal(req.x, x)
    logits = np.array([[1, 2, 3], [3, 2, 1], [0, 5, 0]], np.float32)
    answer, headers, media = _v2.infer_response(req, {"outputs": logits, "task": "classification"}, CLASSIFIER,
                                                "digits", "2")
    assert media == ("application/octet-stream" if binary else "application/json")
    result = InferResult(_Wire(answer, headers), verbose=False)
    assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "7"
    assert result.as_numpy("class").tolist() == [2, 0, 1]
    np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1, rtol=1e-6)
    assert result.as_numpy("logits") is None  # only what was asked for


def test_binary_tensor_data_is_checked_like_json():
    bad = np.array([[0, 0, np.inf, 0]], np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(bad)}}]}).encode()
    with pytest.raises(ContractViolation, match="not finite"):
        _v2.parse_infer(head + bad, str(len(head)), C)
    with pytest.raises(ContractViolation, match="carries 12 bytes"):
        _v2.parse_infer(head + bad[:12], str(len(head)), C)
    with pytest.raises(ContractViolation, match="without the binary tensor data extension"):
        _v2.parse_infer(head, None, C)
