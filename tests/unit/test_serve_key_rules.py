"""Key scopes, expiry, rotation, revocation across replicas, format-1 migration, quotas (token
bucket) and the ingress's refusals: all without Ray."""

import asyncio
import hashlib
import json
import secrets
import time
from datetime import datetime, timedelta, timezone

import pytest

from mlplatform import cli
from mlplatform.errors import ApiKeyError
from mlplatform.serve import Quota, create_key, list_keys, revoke_key, rotate_key
from mlplatform.serve._keys import KeyChecker, parse_expiry
from mlplatform.serve._quota import QuotaLimiter, TokenBucket, retry_after_header


def verdict(checker, key, scopes=("predict",)):
    v = asyncio.run(checker.check(key, scopes))
    return v.outcome, v.key_id


def test_scopes_default_to_predict_and_are_enforced(tmp_path):
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    plain = create_key("digits", keys_dir=tmp_path)
    watcher = create_key("digits", scopes=["metrics"], keys_dir=tmp_path)
    both = create_key("digits", scopes="metrics,predict", keys_dir=tmp_path)
    assert plain.record.scopes == ("predict",) and both.record.scopes == ("predict", "metrics")
    assert verdict(checker, plain.key) == ("ok", plain.record.key_id)
    assert verdict(checker, watcher.key) == ("scope", watcher.record.key_id)
    assert verdict(checker, watcher.key, ("predict", "metrics"))[0] == "ok"
    assert verdict(checker, both.key, ("metrics",))[0] == "ok"
    assert verdict(checker, plain.key, ("admin",))[0] == "scope"
    with pytest.raises(ApiKeyError, match="predict, metrics, admin"):
        create_key("digits", scopes=["write"], keys_dir=tmp_path)
    with pytest.raises(ApiKeyError, match="`scopes`"):
        create_key("digits", scopes=[], keys_dir=tmp_path)


def test_expiry_parsing_and_an_expired_key_is_refused(tmp_path):
    now = datetime.now(timezone.utc)
    assert abs((parse_expiry("30d") - now) - timedelta(days=30)) < timedelta(seconds=5)
    assert parse_expiry("2099-01-01T00:00:00Z") == datetime(2099, 1, 1, tzinfo=timezone.utc)
    assert parse_expiry(None) is None
    for bad, why in (("2001-01-01T00:00:00Z", "not in the future"), ("soon", "duration"), ("-5d", "duration")):
        with pytest.raises(ApiKeyError, match=why):
            parse_expiry(bad)
    made = create_key("digits", expires="1s", keys_dir=tmp_path)
    later = create_key("digits", expires=timedelta(days=1), keys_dir=tmp_path)
    time.sleep(1.1)
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    assert verdict(checker, made.key) == ("expired", made.record.key_id)
    assert verdict(checker, later.key)[0] == "ok"
    assert [k.state for k in list_keys("digits", keys_dir=tmp_path)] == ["expired", "active"]


def test_rotation_keeps_scopes_and_quota_and_the_old_key_works_until_the_grace_ends(tmp_path):
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    old = create_key("digits", label="ci", scopes=["predict", "metrics"], quota=Quota.of(5, 10),
                     expires="30d", keys_dir=tmp_path)
    new = rotate_key("digits", old.record.key_id, grace="1h", keys_dir=tmp_path)
    assert (new.record.scopes, new.record.quota, new.record.label) == (old.record.scopes, Quota(5.0, 10), "ci")
    assert new.record.expires_at and new.key != old.key
    assert verdict(checker, old.key)[0] == verdict(checker, new.key)[0] == "ok"  # both during the grace
    stored = {k.key_id: k for k in list_keys("digits", keys_dir=tmp_path)}[old.record.key_id]
    assert stored.rotated_to == new.record.key_id
    assert datetime.fromisoformat(stored.expires_at) < datetime.now(timezone.utc) + timedelta(hours=1, seconds=5)

    newest = rotate_key("digits", new.record.key_id, grace=0, keys_dir=tmp_path)
    assert verdict(checker, new.key) == ("expired", new.record.key_id)
    assert verdict(checker, newest.key)[0] == "ok"
    with pytest.raises(ApiKeyError, match="is expired; only an active key can be rotated"):
        rotate_key("digits", new.record.key_id, keys_dir=tmp_path)
    revoke_key("digits", newest.record.key_id, keys_dir=tmp_path)
    with pytest.raises(ApiKeyError, match="is revoked"):
        rotate_key("digits", newest.record.key_id, keys_dir=tmp_path)
    with pytest.raises(ApiKeyError, match="`grace`"):
        rotate_key("digits", old.record.key_id, grace="a while", keys_dir=tmp_path)


def test_revocation_reaches_every_replica_checker_within_its_recheck(tmp_path):
    made = create_key("digits", keys_dir=tmp_path)
    replicas = [KeyChecker("digits", tmp_path) for _ in range(3)]  # the default 1 s recheck
    assert {verdict(c, made.key)[0] for c in replicas} == {"ok"}  # each has the file cached now
    revoke_key("digits", made.record.key_id, keys_dir=tmp_path)
    time.sleep(1.1)
    assert {verdict(c, made.key) for c in replicas} == {("revoked", made.record.key_id)}


def test_format_1_key_files_migrate_to_predict_and_metrics(tmp_path):
    secret, salt = secrets.token_urlsafe(32), secrets.token_hex(16)
    digest = hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
    (tmp_path / "digits.json").write_text(json.dumps({"format": 1, "app": "digits", "keys": [
        {"key_id": "0123456789ab", "label": "old", "salt": salt, "sha256": digest,
         "created_at": "2025-01-01T00:00:00+00:00", "revoked_at": None}]}))
    key = f"mlp.digits.0123456789ab.{secret}"
    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    assert verdict(checker, key, ("predict",))[0] == verdict(checker, key, ("metrics",))[0] == "ok"
    assert verdict(checker, key, ("admin",))[0] == "scope"
    [old] = list_keys("digits", keys_dir=tmp_path)
    assert (old.scopes, old.expires_at, old.quota, old.state) == (("predict", "metrics"), None, None, "active")
    create_key("digits", keys_dir=tmp_path)  # the next write stores format 2, the old key unchanged in meaning
    data = json.loads((tmp_path / "digits.json").read_text())
    assert data["format"] == 2 and "scopes" not in data["keys"][0]
    assert verdict(checker, key, ("metrics",))[0] == "ok"
    assert secret not in (tmp_path / "digits.json").read_text()


def test_token_bucket_bursts_then_refills_at_the_rate():
    bucket = TokenBucket(rate=2.0, capacity=3.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token comes every 1/rate s
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.6) == pytest.approx(0.4)
    assert [bucket.take(100.0) for _ in range(4)][-1] > 0  # idle time refills only up to the burst


def test_quota_is_divided_over_ingress_replicas():
    now = [0.0]
    limiter = QuotaLimiter(clock=lambda: now[0])
    quota = Quota.of(10, burst=20)
    assert limiter.take("k", None) == 0.0  # no quota: never limited
    assert sum(limiter.take("k", quota) == 0.0 for _ in range(30)) == 20
    limiter.set_replicas(4)  # each of 4 replicas: 2.5 requests/s, burst 5
    now[0] = 10.0
    assert sum(limiter.take("k", quota) == 0.0 for _ in range(30)) == 5
    assert limiter.take("k", quota) == pytest.approx(0.4)
    assert retry_after_header(0.4) == "1" and retry_after_header(2.01) == "3"
    tiny = QuotaLimiter()
    tiny.set_replicas(8)
    assert tiny.take("t", Quota.of(1, burst=2)) == 0.0  # a burst below one per replica rounds up to 1
    for bad in (dict(rate=0), dict(rate="x"), dict(rate=float("inf")), dict(rate=1, burst=0)):
        with pytest.raises(ApiKeyError, match="`rate`|`burst`"):
            Quota.of(**bad)


def test_the_ingress_refuses_keys_in_query_strings_and_huge_headers_without_echoing_them():
    from mlplatform.serve._ingress import MAX_HEADER_BYTES, _guard

    key = "mlp.digits.0123456789ab." + secrets.token_urlsafe(32)
    for query in (f"api_key={key}", f"x=1&KEY={key}", "token=abc"):
        refusal = _guard({"query_string": query.encode(), "headers": []})
        assert refusal.status == 400 and "Authorization header" in refusal.message
        assert key not in json.dumps(refusal.body())
    assert _guard({"query_string": b"debug=1", "headers": [(b"host", b"x")]}) is None
    big = _guard({"query_string": b"", "headers": [(b"x-pad", b"a" * MAX_HEADER_BYTES)]})
    assert big.status == 431 and big.code == "headers_too_large"


def test_refusals_name_the_key_the_reason_and_the_fix(tmp_path):
    from mlplatform.serve._ingress import _auth_refusal

    checker = KeyChecker("digits", tmp_path, recheck_s=0)
    watcher = create_key("digits", scopes=["metrics"], keys_dir=tmp_path)
    other = create_key("fraud", keys_dir=tmp_path)
    gone = create_key("digits", keys_dir=tmp_path)
    revoke_key("digits", gone.record.key_id, keys_dir=tmp_path)
    cases = [(None, 401, "No API key"), ("garbage", 401, "Unknown or malformed"),
             (watcher.key, 403, "needs predict"), (other.key, 403, "belongs to application 'fraud'"),
             (gone.key, 401, "was revoked")]
    for key, status, why in cases:
        refusal = _auth_refusal(asyncio.run(checker.check(key)), "digits", ("predict",), "POST /v1/predict")
        body = json.dumps(refusal.body())
        assert refusal.status == status and why in refusal.message and "mlplatform serve keys" in refusal.message
        if key and key.startswith("mlp."):
            assert key.split(".")[2] in body and key.split(".")[3] not in body


def test_cli_create_rotate_list(tmp_path, capsys):
    d = str(tmp_path)
    assert cli.main(["serve", "keys", "create", "digits", "--scope", "metrics", "--scope", "predict",
                     "--expires-in", "30d", "--rate", "5", "--burst", "10", "--keys-dir", d]) in (0, None)
    key_id = capsys.readouterr().out.split("key id ")[1].split()[0]
    assert cli.main(["serve", "keys", "rotate", "digits", key_id, "--grace", "15m", "--keys-dir", d]) in (0, None)
    assert f"replaces {key_id}" in capsys.readouterr().out
    assert cli.main(["serve", "keys", "list", "digits", "--keys-dir", d]) in (0, None)
    listing = capsys.readouterr().out
    assert listing.count("predict,metrics") == 2 and "5 requests/s (burst 10)" in listing
    assert cli.main(["serve", "keys", "create", "digits", "--expires-in", "yesterday", "--keys-dir", d]) != 0
    assert "`expires`" in capsys.readouterr().err
