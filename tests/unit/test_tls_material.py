"""The cluster CA and its certificates (mlplatform.cluster.tls): no Ray needed."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mlplatform.cluster import tls
from mlplatform.cluster.spec import ClusterSpec
from mlplatform.errors import PlatformError

IP = "192.0.2.7"


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_ensure_makes_a_ca_node_and_client_certs_signed_by_it(tmp_path):
    m = tls.ensure(tmp_path / "tls", "c1", ["head", "cpu-0"], ip=IP)
    ca = _cert(m.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for cert_path in (m.node_cert("head"), m.node_cert("cpu-0"), m.client_cert):
        cert = _cert(cert_path)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address(IP)} <= set(sans.get_values_for_type(x509.IPAddress))
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        # Ray processes (and drivers) are both gRPC servers and clients of each other.
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    # Each pair loads as a TLS server identity, trusted by a client holding the CA.
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(m.node_cert("head"), m.node_key("head"))
    ssl.create_default_context(cafile=m.ca_cert)


def test_private_keys_are_0600_in_a_0700_directory(tmp_path):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    for key in (m.ca_key, m.node_key("head"), m.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert stat.S_IMODE(m.dir.stat().st_mode) == 0o700


def test_env_points_nodes_and_clients_at_their_own_material(tmp_path):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    assert m.node_env("head") == {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(m.node_cert("head")),
                                  "RAY_TLS_SERVER_KEY": str(m.node_key("head")), "RAY_TLS_CA_CERT": str(m.ca_cert)}
    assert m.client_env()["RAY_TLS_SERVER_KEY"] == str(m.client_key)
    assert set(m.client_env()) == set(tls.TLS_ENV)


def test_the_ca_is_kept_across_ups_and_renew_reissues_leaves_from_it(tmp_path):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    ca_before, head_before = m.ca_cert.read_bytes(), m.node_cert("head").read_bytes()
    tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    assert m.ca_cert.read_bytes() == ca_before and m.node_cert("head").read_bytes() == head_before
    renewed = tls.renew(tmp_path / "tls", "c1", ip=IP)
    assert set(renewed) == {m.node_cert("head"), m.client_cert}
    assert m.ca_cert.read_bytes() == ca_before and m.node_cert("head").read_bytes() != head_before
    _cert(m.node_cert("head")).verify_directly_issued_by(_cert(m.ca_cert))


def test_another_clusters_ca_does_not_verify_this_clusters_certificates(tmp_path):
    mine = tls.ensure(tmp_path / "a", "a", ["head"], ip=IP)
    other = tls.ensure(tmp_path / "b", "b", ["head"], ip=IP)
    with pytest.raises(ValueError):  # issuer differs (and the signature would not verify)
        _cert(mine.node_cert("head")).verify_directly_issued_by(_cert(other.ca_cert))


def _expire(m: tls.Material, monkeypatch, days: float) -> None:
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)
    monkeypatch.setattr(tls, "_now", lambda: later)


def test_an_expiring_certificate_names_the_file_and_the_renew_command(tmp_path, monkeypatch):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    _expire(m, monkeypatch, tls.LEAF_DAYS - 3)  # 3 days left: under MIN_REMAINING_DAYS
    with pytest.raises(tls.CertificateError) as e:
        tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    assert isinstance(e.value, PlatformError)
    assert str(m.node_cert("head")) in str(e.value) or str(m.client_cert) in str(e.value)
    assert "expires in" in str(e.value) and "mlplatform cluster certs renew --name c1" in str(e.value)
    _expire(m, monkeypatch, tls.LEAF_DAYS + 1)
    with pytest.raises(tls.CertificateError, match="expired"):
        tls.check(m, "c1")
    assert "BEGIN" not in str(e.value)  # no key or certificate material in the message


def test_renew_fixes_an_expiring_leaf(tmp_path, monkeypatch):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    _expire(m, monkeypatch, tls.LEAF_DAYS - 3)
    with pytest.raises(tls.CertificateError):
        tls.check(m, "c1")
    tls.renew(tmp_path / "tls", "c1", ip=IP)  # issued "now" (the patched clock): a full validity again
    tls.check(m, "c1")


def test_an_expiring_ca_cannot_be_renewed_in_place(tmp_path, monkeypatch):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    _expire(m, monkeypatch, tls.CA_DAYS + 1)
    with pytest.raises(tls.CertificateError, match="cannot be renewed in place") as e:
        tls.renew(tmp_path / "tls", "c1", ip=IP)
    assert str(m.ca_cert) in str(e.value)


def test_renew_without_a_ca_says_how_to_get_one(tmp_path):
    with pytest.raises(tls.CertificateError, match="cluster up"):
        tls.renew(tmp_path / "none", "c1", ip=IP)


def test_serve_https_options_use_the_head_certificate(tmp_path):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    assert tls.serve_http_options(m) == {"ssl_certfile": str(m.node_cert("head")), "ssl_keyfile": str(m.node_key("head"))}


_SPEC = {"name": "c", "head": {"name": "head", "cpus": 1, "memory_gb": 1, "region": "r", "zone": "z"}}


def test_tls_is_on_unless_a_spec_turns_it_off_explicitly():
    assert ClusterSpec.model_validate(_SPEC).tls is True
    assert ClusterSpec.model_validate({**_SPEC, "tls": False}).tls is False


def _recorded_cluster(tmp_path, monkeypatch, *, with_tls: bool):
    """A cluster state as `up` records it, whose 'head' is this test process (so it counts as running)."""
    import os

    import psutil

    from mlplatform.cluster import local

    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    cdir = local._cluster_dir("c1")
    material = tls.ensure(cdir / "tls", "c1", ["head"], ip=IP) if with_tls else None
    head = local.NodeProcess("head", "head", os.getpid(), psutil.Process().create_time(), str(tmp_path / "log"))
    cluster = local.LocalCluster("c1", "", f"{IP}:6379", "http://127.0.0.1:8265", "ray://127.0.0.1:10001",
                                 str(cdir / "auth_token"), str(tmp_path / "ray"), (head,),
                                 tls_dir=str(material.dir) if material else "")
    local._write_state(cluster)
    return cluster, material


def test_cluster_env_and_serve_deploy_use_the_clusters_material(tmp_path, monkeypatch):
    from mlplatform.serve import _manage

    cluster, material = _recorded_cluster(tmp_path, monkeypatch, with_tls=True)
    assert cluster.env()["RAY_TLS_SERVER_CERT"] == str(material.client_cert)
    # `mlplatform serve deploy` gives Serve the cluster's certificate, so its proxy starts with HTTPS.
    assert _manage._https_options("http://127.0.0.1:8265/") == tls.serve_http_options(material)
    assert _manage._https_options("http://127.0.0.1:9999") == {}


def test_a_cluster_without_tls_exports_no_tls_variables(tmp_path, monkeypatch):
    from mlplatform.serve import _manage

    cluster, _ = _recorded_cluster(tmp_path, monkeypatch, with_tls=False)
    assert not set(tls.TLS_ENV) & set(cluster.env()) and cluster.tls() is None
    assert _manage._https_options("http://127.0.0.1:8265") == {}


def test_connect_refuses_an_expiring_client_certificate(tmp_path, monkeypatch):
    import importlib

    connect = importlib.import_module("mlplatform.cluster.connect")  # the package exports a function of that name
    _, material = _recorded_cluster(tmp_path, monkeypatch, with_tls=True)
    _expire(material, monkeypatch, tls.LEAF_DAYS - 1)
    with pytest.raises(tls.CertificateError, match="certs renew --name c1"):
        connect.authenticate("c1")


def test_renew_cli_names_what_it_renewed_and_says_a_restart_is_needed(tmp_path, monkeypatch, capsys):
    from mlplatform import cli

    _, material = _recorded_cluster(tmp_path, monkeypatch, with_tls=True)
    monkeypatch.setattr("mlplatform.cluster.local._node_ip", lambda: IP)
    before = material.client_cert.read_bytes()
    cli.main(["cluster", "certs", "renew", "--name", "c1"])
    out = capsys.readouterr().out
    assert f"renewed {material.client_cert}" in out and "until restarted" in out
    assert material.client_cert.read_bytes() != before


def test_a_changed_machine_address_gets_new_leaves_from_the_same_ca(tmp_path):
    m = tls.ensure(tmp_path / "tls", "c1", ["head"], ip=IP)
    ca = m.ca_cert.read_bytes()
    tls.ensure(tmp_path / "tls", "c1", ["head"], ip="192.0.2.99")
    sans = _cert(m.node_cert("head")).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("192.0.2.99") in sans.get_values_for_type(x509.IPAddress)
    assert m.ca_cert.read_bytes() == ca
