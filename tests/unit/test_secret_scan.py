"""The log scanner behind test_zz_no_secrets_in_logs finds what it must, and says where."""

import json
import secrets

from secret_scan import scan, session_logs


def test_a_planted_key_token_and_private_key_are_found_by_file_and_line(tmp_path):
    from mlplatform.serve import create_key

    key = create_key("digits", keys_dir=tmp_path / "keys").key
    token = secrets.token_hex(32)
    home = tmp_path / "home"
    cdir = home / "clusters" / "three-region"
    ray_logs = tmp_path / "mlp-three-region-x" / "head" / "session_1" / "logs"
    for d in (cdir / "logs", ray_logs / "serve"):
        d.mkdir(parents=True)
    (cdir / "auth_token").write_text(token + "\n")
    (cdir / "state.json").write_text(json.dumps({"temp_dir": str(tmp_path / "mlp-three-region-x"),
                                                 "token_path": str(cdir / "auth_token")}))
    (cdir / "logs" / "head.out").write_text("starting\n" + f"env RAY_AUTH_TOKEN={token}\n")
    (ray_logs / "serve" / "replica_digits.log").write_text("ok\nok\n" + f"INFO headers: Bearer {key}\n")
    (ray_logs / "raylet.err").write_text("-----BEGIN EC PRIVATE KEY-----\n")
    (ray_logs / "clean.log").write_text("mlp.digits.0123456789ab.nope and mlp.digits.0123456789ab.***\n")
    pytest_log = tmp_path / "captured.log"
    pytest_log.write_text("nothing here\n")

    files, tokens = session_logs(home, extra=[pytest_log])
    assert tokens == [token]
    assert {f.name for f in files} == {"head.out", "replica_digits.log", "raylet.err", "clean.log", "captured.log"}
    findings = scan(files, tokens)
    assert sorted((f.path.name, f.line, f.what.split(" (")[0]) for f in findings) == sorted([
        ("head.out", 2, "a cluster auth token"),
        ("replica_digits.log", 3, f"API key mlp.digits.{key.split('.')[2]}.***"),
        ("raylet.err", 1, "a PEM private key"),
    ])
    report = "\n".join(map(str, findings))
    assert key not in report and token not in report  # the failure message is a log too
    assert str(ray_logs / "serve" / "replica_digits.log") + ":3:" in report


def test_clean_logs_give_no_findings(tmp_path):
    (tmp_path / "a.log").write_text("GET /v1/predict 401\nkey id 0123456789ab revoked\n")
    assert scan([tmp_path / "a.log", tmp_path / "missing.log"], ["f" * 64]) == []
