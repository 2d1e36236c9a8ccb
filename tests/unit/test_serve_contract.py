"""The request contract: every bad body is a 400/413/422 naming the problem; valid ones parse exactly."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.errors import ServeError
from mlplatform.serve._contract import Contract, ContractViolation
from mlplatform.serve._drift import DriftMonitor, psi_of

SIG = {"names": ["input"], "dtypes": ["float32"], "shapes": [[-1, 4]]}
C = Contract.from_signature(SIG, max_rows=3, max_payload_bytes=2000)


def status(body: bytes) -> tuple[int, str]:
    try:
        C.parse(body)
    except ContractViolation as e:
        return e.status, e.code
    return 200, ""


@pytest.mark.parametrize("body,expected", [
    (b"{", (400, "invalid_json")),
    (b'"x"', (400, "invalid_body")),
    (b'{"inputs": [[1,2,3,4]], "x": 1}', (400, "unknown_field")),
    (b'{"inputs": [[1,2,3]]}', (422, "shape_mismatch")),
    (b'{"inputs": [1,2]}', (422, "shape_mismatch")),
    (b'{"inputs": [[[1,2,3,4]]]}', (422, "shape_mismatch")),
    (b'{"inputs": [[1,2,3,"4"]]}', (422, "dtype_mismatch")),
    (b'{"inputs": [[1,2,3,Infinity]]}', (422, "non_finite")),
    (b'{"inputs": [[1,2,3,1e39]]}', (422, "non_finite")),  # finite in JSON, inf in float32
    (b'{"inputs": [[1,2,3,4],[1,2,3,4],[1,2,3,4],[1,2,3,4]]}', (413, "too_many_rows")),
    (b'{"inputs": [[1,2,3,' + b" " * 3000 + b"4]]}", (413, "payload_too_large")),
])
def test_bad_bodies(body, expected):
    assert status(body) == expected


def test_valid_body_parses_to_float32_rows():
    x = C.parse(b'{"inputs": [[1, 2.5, 3, 4], [0, 0, 0, 0]]}')
    assert x.dtype == np.float32 and x.shape == (2, 4) and x[0, 1] == 2.5


def test_content_length_checked_before_reading():
    with pytest.raises(ContractViolation) as e:
        C.check_length("5000")
    assert e.value.status == 413
    with pytest.raises(ContractViolation, match="Content-Length 'lots' is not a number") as e:
        C.check_length("lots")
    assert e.value.status == 400


def test_signature_problems_are_named():
    with pytest.raises(ServeError, match="no input_signature"):
        Contract.from_signature(None, 1, 100, "d@1")
    with pytest.raises(ServeError, match="exactly one"):
        Contract.from_signature({"names": ["a", "b"], "dtypes": ["float32"] * 2, "shapes": [[-1, 1]] * 2}, 1, 100)
    with pytest.raises(ServeError, match="only the first axis dynamic"):
        Contract.from_signature({"names": ["a"], "dtypes": ["float32"], "shapes": [[-1, -1]]}, 1, 100)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4))
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(_json, st.builds(lambda v: {"inputs": v}, _json)))
def test_any_json_is_a_clean_verdict(data):
    body = json.dumps(data).encode()  # NaN/Infinity included: json.dumps writes them
    code, _ = status(body)
    assert code in (200, 400, 413, 422)
    if code == 200:
        x = C.parse(body)
        assert x.shape[1:] == (4,) and np.isfinite(x).all() and 1 <= len(x) <= 3


def test_psi_zero_for_same_distribution_high_for_shifted():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2000, 3))
    same = DriftMonitor(ref, window_rows=2000).observe(rng.normal(size=(2000, 3)))
    assert same is not None and (same < 0.05).all()
    shifted = DriftMonitor(ref, window_rows=2000).observe(rng.normal(loc=1.0, size=(2000, 3)))
    assert (shifted > 0.2).all()
    assert psi_of(np.array([0.5, 0.5]), np.array([0.5, 0.5])) == 0
