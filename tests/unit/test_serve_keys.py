"""API keys: plaintext once, stored salted-hashed, scoped per application, revocable."""

import asyncio
import secrets
import stat
import threading
from pathlib import Path

import pytest

from mlplatform.errors import ApiKeyError
from mlplatform.serve import create_key, list_keys, revoke_key
from mlplatform.serve._keys import KeyChecker


def check(checker: KeyChecker, presented: str | None) -> tuple[str, str | None]:
    verdict = asyncio.run(checker.check(presented))
    return verdict.outcome, verdict.key_id


def test_create_check_revoke(tmp_path):
    made = create_key("digits", label="ci", keys_dir=tmp_path)
    stored = (tmp_path / "digits.json").read_text()
    assert made.key.split(".")[-1] not in stored  # only the hash is kept
    assert stat.S_IMODE((tmp_path / "digits.json").stat().st_mode) == 0o600
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    assert check(checker, made.key) == ("ok", made.record.key_id)
    assert check(checker, None)[0] == "missing"
    assert check(checker, made.key[:-1] + "x")[0] == "invalid"
    assert check(checker, "Bearer nonsense")[0] == "invalid"
    revoke_key("digits", made.record.key_id, keys_dir=tmp_path)
    assert check(checker, made.key) == ("revoked", made.record.key_id)
    assert [k.active for k in list_keys("digits", keys_dir=tmp_path)] == [False]


def test_a_valid_key_of_another_app_is_forbidden(tmp_path):
    other = create_key("fraud", keys_dir=tmp_path)
    assert check(KeyChecker("digits", tmp_path), other.key)[0] == "forbidden"
    # A forged key naming another app is merely invalid.
    assert check(KeyChecker("digits", tmp_path), "mlp.fraud.0123456789ab.secret")[0] == "invalid"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ApiKeyError, match="no such key"):
        revoke_key("digits", "000000000000", keys_dir=tmp_path)
    with pytest.raises(ApiKeyError, match="`app`"):
        create_key("Bad/App", keys_dir=tmp_path)


def test_forged_keys_naming_made_up_apps_leave_the_cache_bounded(tmp_path):
    valid = create_key("digits", keys_dir=tmp_path)
    revoked = create_key("digits", keys_dir=tmp_path)
    revoke_key("digits", revoked.record.key_id, keys_dir=tmp_path)
    other = create_key("fraud", keys_dir=tmp_path)
    checker = KeyChecker("digits", tmp_path)

    async def flood() -> list[tuple[str, str | None]]:
        forged = [f"mlp.app-{secrets.token_hex(8)}.{secrets.token_hex(6)}.secret" for _ in range(2000)]
        verdicts = [await checker.check(key) for key in forged]
        verdicts += [await checker.check(k) for k in (valid.key, revoked.key, other.key, valid.key[:-1] + "x")]
        return [(v.outcome, v.key_id) for v in verdicts]

    verdicts = asyncio.run(flood())
    assert {v for v, _ in verdicts[:2000]} == {"invalid"}
    assert verdicts[2000:] == [("ok", valid.record.key_id), ("revoked", revoked.record.key_id),
                               ("forbidden", other.record.key_id), ("invalid", None)]
    assert sorted(checker._cache) == ["digits", "fraud"]  # only applications that have a key file


def test_key_files_are_read_off_the_event_loop(tmp_path, monkeypatch):
    made = create_key("digits", keys_dir=tmp_path)
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    touched: list[tuple[str, int]] = []  # (what, thread) for every access to a key file
    for name in ("stat", "read_text", "read_bytes", "open"):
        original = getattr(Path, name)

        def recording(self, *args, _name=name, _original=original, **kwargs):
            if self.parent == tmp_path:
                touched.append((_name, threading.get_ident()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Path, name, recording)

    async def checks() -> tuple[list[tuple[str, str | None]], int]:
        verdicts = [await checker.check(made.key), await checker.check("mlp.nope.0123456789ab.secret")]
        return [(v.outcome, v.key_id) for v in verdicts], threading.get_ident()

    verdicts, loop_thread = asyncio.run(checks())
    assert verdicts == [("ok", made.record.key_id), ("invalid", None)]
    assert {what for what, _ in touched} >= {"stat", "read_text"}
    assert all(thread != loop_thread for _, thread in touched), touched
