"""API keys: plaintext once, stored salted-hashed, scoped per application, revocable."""

import stat

import pytest

from mlplatform.errors import ApiKeyError
from mlplatform.serve import create_key, list_keys, revoke_key
from mlplatform.serve._keys import KeyChecker


def test_create_check_revoke(tmp_path):
    made = create_key("digits", label="ci", keys_dir=tmp_path)
    stored = (tmp_path / "digits.json").read_text()
    assert made.key.split(".")[-1] not in stored  # only the hash is kept
    assert stat.S_IMODE((tmp_path / "digits.json").stat().st_mode) == 0o600
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    assert checker.check(made.key) == ("ok", made.record.key_id)
    assert checker.check(None)[0] == "missing"
    assert checker.check(made.key[:-1] + "x")[0] == "invalid"
    assert checker.check("Bearer nonsense")[0] == "invalid"
    revoke_key("digits", made.record.key_id, keys_dir=tmp_path)
    assert checker.check(made.key)[0] == "invalid"
    assert [k.active for k in list_keys("digits", keys_dir=tmp_path)] == [False]


def test_a_valid_key_of_another_app_is_forbidden(tmp_path):
    other = create_key("fraud", keys_dir=tmp_path)
    assert KeyChecker("digits", tmp_path).check(other.key)[0] == "forbidden"
    # A forged key naming another app is merely invalid.
    assert KeyChecker("digits", tmp_path).check("mlp.fraud.0123456789ab.secret")[0] == "invalid"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ApiKeyError, match="no such key"):
        revoke_key("digits", "000000000000", keys_dir=tmp_path)
    with pytest.raises(ApiKeyError, match="`app`"):
        create_key("Bad/App", keys_dir=tmp_path)
