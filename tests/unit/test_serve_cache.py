"""The opt-in response cache of model replicas (serve/_cache.py) and its ServeSpec switch."""

import numpy as np
import pytest

from mlplatform.serve._cache import ResponseCache, _size


def test_key_covers_version_variant_dtype_shape_and_bytes():
    c = ResponseCache(1 << 20, "digits@2", "onnx_fp32")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert c.key(x) == c.key(x.copy())
    assert c.key(x) != c.key(x.reshape(4, 2))  # same bytes, other shape
    assert c.key(x) != c.key(x.astype(np.float64))
    y = x.copy()
    y[1, 3] = 7.5
    assert c.key(x) != c.key(y)
    assert c.key(x) != ResponseCache(1 << 20, "digits@3", "onnx_fp32").key(x)
    assert c.key(x) != ResponseCache(1 << 20, "digits@2", "onnx_int8").key(x)
    assert c.key(np.asfortranarray(x)) == c.key(x)  # layout does not matter, values do


def test_hits_misses_and_answers_are_immutable():
    c = ResponseCache(1 << 20, "m@1", "onnx_fp32")
    x = np.ones((1, 4), np.float32)
    k = c.key(x)
    assert c.get(k) is None and (c.hits, c.misses) == (0, 1)
    answer = np.array([[0.1, 0.9]], np.float32)
    c.put(k, answer)
    answer[0, 0] = 5.0  # the caller's array changing afterwards does not change the cached answer
    got = c.get(k)
    assert (c.hits, c.misses) == (1, 1) and got[0].tolist() == pytest.approx([0.1, 0.9])
    with pytest.raises(ValueError):
        got[0, 0] = 1.0


def test_memory_is_bounded_and_least_recently_used_goes_first():
    one = np.zeros((1, 10), np.float32)
    budget = 3 * _size(one)
    c = ResponseCache(budget, "m@1", "v")
    keys = [c.key(np.full((1, 4), i, np.float32)) for i in range(4)]
    for k in keys[:3]:
        c.put(k, one)
    assert len(c) == 3 and c.bytes == budget
    c.get(keys[0])  # 0 is now the most recently used: 1 is evicted next
    c.put(keys[3], one)
    assert len(c) == 3 and c.bytes <= budget
    assert c.get(keys[1]) is None and c.get(keys[0]) is not None and c.get(keys[3]) is not None
    c.put(keys[3], one)  # replacing an entry does not count it twice
    assert c.bytes == budget
    c.put(c.key(one), np.zeros((1000, 1000), np.float32))  # bigger than the whole budget: not kept
    assert c.bytes == budget and len(c) == 3


def test_cache_is_off_by_default_and_validated():
    from mlplatform import config
    from mlplatform.errors import SpecError
    from mlplatform.serve._spec import ServeSpec

    base = {"name": "d", "model": "digits@1", "registry_root": "/tmp/r"}
    spec = config.validate(base, ServeSpec, "args")
    assert spec.primary.cache.enabled is False
    on = config.validate({**base, "primary": {"cache": {"enabled": True, "max_bytes": 1 << 20}}}, ServeSpec, "args")
    assert on.primary.cache.enabled and on.primary.cache.max_bytes == 1 << 20
    with pytest.raises(SpecError, match="max_bytes"):
        config.validate({**base, "primary": {"cache": {"enabled": True, "max_bytes": 10}}}, ServeSpec, "args")
