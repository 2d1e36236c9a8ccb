"""Users and roles: the roles matrix, hashed tokens, the operator bootstrap, refusals, the audit
record of every decision, and the issue's "Done when" through the real CLI."""

import json
import os
import pickle
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import REPO

from mlplatform import access, registry
from mlplatform._internal.metadata.tables import access_tokens
from mlplatform.access import ACTIONS, Role, _store
from mlplatform.access._roles import AccessError
from mlplatform.cli import main
from mlplatform.residency import audit

CLI = [sys.executable, "-m", "mlplatform.cli"]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A platform home of the test's own: its own operator bootstrap and access trail."""
    path = tmp_path / "home"
    monkeypatch.setenv("MLPLATFORM_HOME", str(path))
    for name in (access.TOKEN_ENV, access.TOKEN_FILE_ENV, access.BOOTSTRAP_ENV):
        monkeypatch.delenv(name, raising=False)
    return path


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # PostgreSQL keeps users across the session's tests


def decisions(**match):
    return list(audit.read(access.local_trail(), "access", **match))


# --- roles matrix (no database) ---------------------------------------------------------------


@pytest.mark.parametrize("held", list(Role))
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_roles_matrix_is_ordered_and_scoped(held, action):
    on = "*" if action.startswith(("users.", "residency.", "keys.")) else "registry:digits"
    needs = ACTIONS[action]
    everywhere = _store.User("u", {"*": held}, "t", "t")
    assert (everywhere.role_on(on).rank >= needs.rank) == (held.rank >= needs.rank)
    # A grant on one resource counts there, never on another one nor globally.
    scoped = _store.User("u", {"registry:digits": held}, "t", "t")
    assert scoped.role_on("registry:other") is None
    assert scoped.role_on("*") is None
    if on != "*":
        assert scoped.role_on(on) is held


def test_the_matrix_matches_the_issue():
    assert ACTIONS["registry.register"] is ACTIONS["registry.export"] is Role.developer
    assert {ACTIONS[a] for a in ("registry.alias.set", "registry.alias.promote", "registry.alias.rollback",
                                 "serve.deploy")} == {Role.deployer}
    assert {ACTIONS[a] for a in ("residency.policy.apply", "serve.keys.create", "users.add")} == {Role.admin}
    assert list(Role) == [Role.viewer, Role.developer, Role.deployer, Role.admin]


def test_the_highest_of_global_and_resource_grant_counts():
    user = _store.User("u", {"*": Role.viewer, "serve:digits-cpu": Role.deployer}, "t", "t")
    assert user.role_on("serve:digits-cpu") is Role.deployer
    assert user.role_on("serve:other") is Role.viewer


@pytest.mark.parametrize("bad", ["registry:", "registry:../x", "s3:digits", "serve:a b", "everything"])
def test_a_bad_resource_is_refused_with_the_accepted_forms(bad):
    with pytest.raises(AccessError, match=r"registry:<model name>.*serve:<application>"):
        access._roles.resource(bad)


# --- the store (SQLite and PostgreSQL) ---------------------------------------------------------


@pytest.mark.usefixtures("metadata_backend")
def test_tokens_are_stored_salted_and_hashed_never_in_plain(home):
    name = unique("alice")
    user, token = access.add_user(name, "developer", "registry:digits")
    assert user.grants == {"registry:digits": Role.developer}
    _, token_id, secret = token.split(".")
    assert len(secret) >= 43  # 256 bits, urlsafe base64
    with _store.engine().connect() as conn:
        rows = conn.execute(sa.select(access_tokens).where(access_tokens.c.name == name)).mappings().all()
    assert len(rows) == 1
    row = dict(rows[0])
    assert row["token_id"] == token_id and secret not in json.dumps(row, default=str)
    assert row["sha256"] == _store.digest(row["salt"], secret)
    eng = _store.engine()
    assert _store.user_for_token(eng, token).name == name
    assert _store.user_for_token(eng, f"mlpu.{token_id}.{'A' * 43}") is None  # right id, wrong secret
    assert _store.user_for_token(eng, "not-a-token") is None
    access.remove_user(name)
    assert _store.user_for_token(eng, token) is None


@pytest.mark.usefixtures("metadata_backend")
def test_the_operator_is_bootstrapped_once_per_home_in_a_private_file(home):
    first = access.whoami()
    assert first.user.name == access.OPERATOR and first.user.role_on("*") is Role.admin
    files = list((home / "access").glob("operator-*.token"))
    assert len(files) == 1
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert stat.S_IMODE(files[0].parent.stat().st_mode) == 0o700
    token = files[0].read_text()
    assert access.whoami().user.name == access.OPERATOR and files[0].read_text() == token  # reused
    assert [d["action"] for d in decisions(user=access.OPERATOR)] == ["users.bootstrap"]


@pytest.mark.usefixtures("metadata_backend")
def test_a_stale_operator_file_is_replaced_and_bootstrap_can_be_turned_off(home, monkeypatch):
    access.whoami()
    stale = next((home / "access").glob("operator-*.token"))
    stale.write_text("mlpu.0123456789abcdef." + "x" * 43)  # e.g. the database was recreated
    assert access.whoami().user.name == access.OPERATOR
    assert stale.read_text().strip() != "mlpu.0123456789abcdef." + "x" * 43
    monkeypatch.setenv(access.BOOTSTRAP_ENV, "off")
    with pytest.raises(access.AuthenticationError, match="operator bootstrap is off.*MLPLATFORM_TOKEN"):
        access.whoami()


@pytest.mark.usefixtures("metadata_backend")
def test_an_unknown_token_is_refused_and_the_refusal_recorded(home, monkeypatch):
    monkeypatch.setenv(access.TOKEN_ENV, "mlpu.0123456789abcdef." + "y" * 43)
    with pytest.raises(access.AuthenticationError, match="matches no user") as info:
        access.require("registry.alias.set", "registry:digits")
    assert "y" * 43 not in str(info.value)  # never the token itself
    [record] = decisions(action="registry.alias.set")
    assert record["allowed"] is False and record["user"] is None and "y" * 43 not in json.dumps(record)


@pytest.mark.usefixtures("metadata_backend")
def test_a_token_file_identifies_the_caller(home, tmp_path, monkeypatch):
    name = unique("job")
    _, token = access.add_user(name, "developer")
    path = tmp_path / "token"
    path.write_text(token + "\n")
    monkeypatch.setenv(access.TOKEN_FILE_ENV, str(path))
    assert access.whoami().user.name == name
    monkeypatch.setenv(access.TOKEN_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(access.AuthenticationError, match="cannot be read"):
        access.whoami()


@pytest.mark.usefixtures("metadata_backend")
def test_refusal_names_user_role_action_resource_and_the_fix_and_both_decisions_are_audited(home, tmp_path,
                                                                                          monkeypatch):
    root, art = tmp_path / "reg", tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"w" * 64)
    registry.register(art, "digits", root=str(root))  # as the bootstrapped operator
    viewer, deployer = unique("vic"), unique("dee")
    _, viewer_token = access.add_user(viewer, "viewer")
    _, deployer_token = access.add_user(deployer, "deployer", "registry:digits")

    monkeypatch.setenv(access.TOKEN_ENV, viewer_token)
    with pytest.raises(access.AccessDenied) as info:
        registry.set_alias("digits", "production", 1, root=str(root))
    message = str(info.value)
    for part in (repr(viewer), "role viewer on registry:digits", "registry.alias.set", "needs role deployer",
                 f"mlplatform users grant {viewer} --role deployer --on registry:digits"):
        assert part in message, message
    assert viewer_token.split(".")[2] not in message
    assert str(pickle.loads(pickle.dumps(info.value))) == message  # crosses Ray process boundaries intact
    assert registry.list_aliases("digits", root=str(root)) == {}  # nothing moved
    with pytest.raises(access.AccessDenied, match="needs role developer"):
        registry.register(art, "digits", root=str(root))

    monkeypatch.setenv(access.TOKEN_ENV, deployer_token)
    registry.set_alias("digits", "production", 1, root=str(root))
    with pytest.raises(access.AccessDenied, match="no role on registry:other"):
        registry.set_alias("other", "production", 1, root=str(root))

    [refused] = decisions(action="registry.alias.set", user=viewer)
    [allowed] = decisions(action="registry.alias.set", user=deployer, resource="registry:digits")
    assert (refused["allowed"], refused["role"], refused["needed"]) == (False, "viewer", "deployer")
    assert (allowed["allowed"], allowed["role"]) == (True, "deployer")
    assert audit.verify(access.local_trail()).ok
    trail = access.local_trail().read_text()
    assert viewer_token.split(".")[2] not in trail and deployer_token.split(".")[2] not in trail


@pytest.mark.usefixtures("metadata_backend")
def test_only_a_global_admin_manages_users(home, monkeypatch):
    scoped_admin = unique("ops")
    _, token = access.add_user(scoped_admin, "admin", "serve:digits-cpu")
    monkeypatch.setenv(access.TOKEN_ENV, token)
    with pytest.raises(access.AccessDenied, match=r"may not users.add globally"):
        access.add_user(unique("eve"), "admin")
    assert decisions(action="users.add", user=scoped_admin)[0]["allowed"] is False


# --- the issue's "Done when", through the real CLI ---------------------------------------------


def run(*argv, token=None):
    env = {**os.environ}
    env.pop(access.TOKEN_ENV, None)
    if token:
        env[access.TOKEN_ENV] = token
    return subprocess.run([*CLI, *argv], env=env, capture_output=True, text=True, timeout=120)


def cli(capsys, *argv):
    """The same command in this process (argument parsing, dispatch, error printing): a subprocess
    costs ~2 s of imports on 2 cores, so only the issue's alias moves pay for one."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_alias_move_by_a_viewer_is_refused_and_by_a_deployer_allowed_both_audited(home, tmp_path, capsys,
                                                                                       monkeypatch):
    root, art = str(tmp_path / "reg"), tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"w" * 64)
    registry.register(art, "digits", root=root)
    viewer, deployer = unique("vic"), unique("dee")
    tokens = {}
    for name, role in ((viewer, "viewer"), (deployer, "deployer")):
        code, out, err = cli(capsys, "users", "add", name, "--role", role, "--on", "registry:digits")
        assert code == 0, err
        tokens[name] = out.strip().splitlines()[-1]
        assert tokens[name].startswith("mlpu.")

    refused = run("registry", "alias", "digits", "production", "1", "--root", root, token=tokens[viewer])
    assert refused.returncode == 1
    assert f"error: User {viewer!r} (role viewer on registry:digits" in refused.stderr
    assert "needs role deployer" in refused.stderr and tokens[viewer] not in refused.stderr
    assert registry.list_aliases("digits", root=root) == {}

    allowed = run("registry", "alias", "digits", "production", "1", "--root", root, token=tokens[deployer])
    assert allowed.returncode == 0, allowed.stderr
    assert registry.list_aliases("digits", root=root) == {"production": 1}

    [no] = decisions(action="registry.alias.set", user=viewer)
    [yes] = decisions(action="registry.alias.set", user=deployer)
    assert (no["allowed"], no["role"], yes["allowed"], yes["role"]) == (False, "viewer", True, "deployer")
    assert no["pid"] != yes["pid"] != os.getpid()  # recorded by the CLI processes themselves
    assert audit.verify(access.local_trail()).ok

    code, out, _ = cli(capsys, "users", "audit", "--verify")
    assert code == 0 and "hash chain intact" in out
    code, out, _ = cli(capsys, "users", "audit")
    assert [json.loads(line)["allowed"] for line in out.splitlines()
            if json.loads(line)["action"] == "registry.alias.set"] == [False, True]
    assert tokens[viewer] not in out

    monkeypatch.setenv(access.TOKEN_ENV, tokens[deployer])
    assert cli(capsys, "users", "whoami")[1].startswith(f"{deployer}: deployer on registry:digits")
    code, _, err = cli(capsys, "users", "remove", viewer)
    assert code == 1 and "needs role admin" in err
    monkeypatch.delenv(access.TOKEN_ENV)
    code, out, _ = cli(capsys, "users", "list")
    assert viewer in out and tokens[viewer] not in out
    assert cli(capsys, "users", "remove", viewer)[0] == 0
    monkeypatch.setenv(access.TOKEN_ENV, tokens[viewer])
    code, _, err = cli(capsys, "users", "whoami")
    assert code == 1 and "matches no user" in err


def test_every_write_entry_point_checks_the_role_first(home, tmp_path, monkeypatch):
    """A viewer is refused at each gated write before it changes anything (no cluster needed:
    the check runs before any connection)."""
    from mlplatform import residency, serve
    from mlplatform.export import export_model

    root, art = str(tmp_path / "reg"), tmp_path / "art"
    art.mkdir()
    (art / "model.safetensors").write_bytes(b"w" * 64)
    registry.register(art, "digits", root=root)
    made = serve.create_key("digits-cpu", keys_dir=tmp_path / "keys")
    policy = residency.load(REPO / "cluster_configs/residency/uae.yaml")
    _, token = access.add_user(unique("vic"), "viewer")
    monkeypatch.setenv(access.TOKEN_ENV, token)
    writes = {
        "registry.register": lambda: registry.register(art, "digits", root=root),
        "registry.export": lambda: export_model("digits@1", root=root),
        "registry.alias.promote": lambda: registry.promote("digits", root=root),
        "registry.alias.rollback": lambda: registry.rollback("digits", "production", root=root),
        "serve.deploy": lambda: serve.deploy(REPO / "serve_apps/digits-cpu.yaml", address="http://127.0.0.1:1"),
        "serve.delete": lambda: serve.delete("digits-cpu"),
        "serve.keys.create": lambda: serve.create_key("digits-cpu", keys_dir=tmp_path / "keys"),
        "serve.keys.rotate": lambda: serve.rotate_key("digits-cpu", made.record.key_id, keys_dir=tmp_path / "keys"),
        "serve.keys.revoke": lambda: serve.revoke_key("digits-cpu", made.record.key_id, keys_dir=tmp_path / "keys"),
        "residency.policy.apply": lambda: residency.apply(policy),
        "keys.rotate": lambda: main(["--debug", "keys", "rotate"]),
    }
    for action, write in writes.items():
        with pytest.raises(access.AccessDenied, match=f"may not {action.replace('.', '[.]')} "):
            write()
    assert len(registry.list_versions("digits", root=root)) == 1
    assert [k.revoked_at for k in serve.list_keys("digits-cpu", keys_dir=tmp_path / "keys")] == [None]
    refused = {d["action"] for d in decisions(allowed=False)}
    assert refused == set(writes)


@pytest.mark.usefixtures("metadata_backend")
def test_grant_replaces_the_role_on_one_resource_and_bad_input_is_named(home):
    name = unique("gus")
    access.add_user(name, "viewer")
    user = access.grant(name, "deployer", "serve:digits-cpu")
    assert user.grants == {"*": Role.viewer, "serve:digits-cpu": Role.deployer}
    assert access.grant(name, "developer", "serve:digits-cpu").grants["serve:digits-cpu"] is Role.developer
    with pytest.raises(AccessError, match="already exists"):
        access.add_user(name, "viewer")
    with pytest.raises(AccessError, match="must be one of viewer, developer, deployer, admin"):
        access.grant(name, "owner")
    with pytest.raises(AccessError, match="for the user name"):
        access.add_user("../Root", "viewer")
    with pytest.raises(AccessError, match="No user 'nobody-"):
        access.remove_user(unique("nobody"))


def test_a_process_working_for_a_cluster_records_in_that_clusters_trail(home, monkeypatch):
    from mlplatform.residency.names import CLUSTER_ENV

    monkeypatch.setenv(CLUSTER_ENV, "unit-cluster")  # as in a job's processes (not connected to Ray here)
    access.require("registry.alias.set", "registry:digits")
    trail = audit.default_path("unit-cluster")
    assert [r["action"] for r in audit.read(trail, "access")] == ["users.bootstrap", "registry.alias.set"]
    assert not access.local_trail().exists()
