"""A cluster's own certificate authority and the certificates Ray's mutual TLS runs on.

Ray (2.60) encrypts its gRPC traffic (GCS, raylets, workers, object transfer) when every
process starts with RAY_USE_TLS=1, RAY_TLS_SERVER_CERT, RAY_TLS_SERVER_KEY and RAY_TLS_CA_CERT:
each process presents its certificate both as a server and as a client, and every server
demands a client certificate signed by the CA (mutual TLS). So a client needs its own
certificate from the cluster's CA, not just the CA: a process without one, or with another
cluster's, is refused.

Layout, in <cluster dir>/tls/ (private keys mode 0600, the directory 0700):
    ca.crt, ca.key           the cluster's CA; kept across `down`/`up`, so clients' files stay valid
    node-<name>.crt/.key     one per node `up` starts (autoscaled nodes run on the head's)
    client.crt/.key          what `mlplatform cluster env` hands to clients (also Serve's HTTPS)

Every leaf certificate names 127.0.0.1, localhost, the node's IP and the hostname, and allows
both server and client use: Ray processes are both, and so is a driver (its core worker serves
gRPC that raylets call back).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mlplatform._internal import storage
from mlplatform.errors import ClusterError

CA_DAYS = 3650
LEAF_DAYS = 365
# `up`/connect refuse material that expires sooner: a cluster should not die mid-run.
MIN_REMAINING_DAYS = 7


class CertificateError(ClusterError):
    """A certificate is missing, unreadable, expired or about to expire."""


@dataclass(frozen=True)
class Material:
    """Paths of one cluster's TLS files."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    def node_cert(self, node: str) -> Path:
        return self.dir / f"node-{node}.crt"

    def node_key(self, node: str) -> Path:
        return self.dir / f"node-{node}.key"

    def node_env(self, node: str) -> dict[str, str]:
        """What a node's `ray start` needs for Ray's internal mutual TLS."""
        return _ray_env(self.node_cert(node), self.node_key(node), self.ca_cert)

    def client_env(self) -> dict[str, str]:
        """What a client process (ray CLIs, ray.init, a driver) needs to be let in."""
        return _ray_env(self.client_cert, self.client_key, self.ca_cert)

    def leaf_certs(self) -> list[Path]:
        return sorted(self.dir.glob("node-*.crt")) + [self.client_cert]


# Variables that carry TLS settings into Ray processes (also: those that must not leak from
# another cluster's environment into this one's nodes).
TLS_ENV = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def _ray_env(cert: Path, key: Path, ca: Path) -> dict[str, str]:
    return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(cert), "RAY_TLS_SERVER_KEY": str(key),
            "RAY_TLS_CA_CERT": str(ca)}


def ensure(tls_dir: Path, cluster: str, nodes: Iterable[str], *, ip: str) -> Material:
    """The cluster's material: its CA (created on first use, then kept) and a certificate per node
    and for clients (created where missing). Existing files are checked, not silently replaced.

    Raises:
        CertificateError: an existing certificate expires within MIN_REMAINING_DAYS (names the
            file and `mlplatform cluster certs renew`).
    """
    material = Material(Path(tls_dir))
    if not material.ca_cert.exists() or not material.ca_key.exists():
        _write_ca(material, cluster)
    check(material, cluster)
    for node in nodes:
        if not _covers(material.node_cert(node), ip):
            _write_leaf(material, material.node_cert(node), material.node_key(node), f"{cluster}-{node}", ip)
    if not _covers(material.client_cert, ip):
        _write_leaf(material, material.client_cert, material.client_key, f"{cluster}-client", ip)
    return material


def _covers(cert: Path, ip: str) -> bool:
    """Whether `cert` exists and names `ip`: gRPC checks the dialled address against the SANs, so a
    machine whose address changed since the last `up` needs new leaves (same CA)."""
    from cryptography import x509

    if not cert.exists():
        return False
    sans = x509.load_pem_x509_certificate(cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return ipaddress.ip_address(ip) in sans.get_values_for_type(x509.IPAddress)


def renew(tls_dir: Path, cluster: str, *, ip: str) -> list[Path]:
    """New node and client certificates (new keys) from the cluster's existing CA; returns them.

    Clients pick the new client certificate up at once (same CA). Running nodes keep the
    certificate they loaded at start: restart the cluster (`down`, `up`) for them to use theirs.

    Raises:
        CertificateError: there is no CA to renew from, or the CA itself is expiring.
    """
    material = Material(Path(tls_dir))
    if not material.ca_cert.exists() or not material.ca_key.exists():
        raise CertificateError(
            f"Cluster '{cluster}' has no certificate authority in {material.dir}; `mlplatform cluster up` creates one."
        )
    _check_file(material.ca_cert, cluster, ca=True)
    renewed = []
    for cert in material.leaf_certs():
        key = cert.with_suffix(".key")
        common_name = f"{cluster}-{cert.stem.removeprefix('node-')}"
        _write_leaf(material, cert, key, common_name, ip)
        renewed.append(cert)
    return renewed


def check(material: Material, cluster: str) -> None:
    """Raise CertificateError if the CA or any existing leaf certificate expires within MIN_REMAINING_DAYS."""
    _check_file(material.ca_cert, cluster, ca=True)
    for cert in material.leaf_certs():
        if cert.exists():
            _check_file(cert, cluster, ca=False)


def not_after(path: Path) -> datetime.datetime:
    """When the certificate at `path` expires (UTC)."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def _check_file(path: Path, cluster: str, *, ca: bool) -> None:
    try:
        expires = not_after(path)
    except (OSError, ValueError) as e:
        raise CertificateError(f"Certificate {path} of cluster '{cluster}' is unreadable ({type(e).__name__}).") from None
    left = expires - _now()
    if left >= datetime.timedelta(days=MIN_REMAINING_DAYS):
        return
    state = "expired" if left.total_seconds() <= 0 else f"expires in {left.days} day(s)"
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if ca:
        how = (f"a CA cannot be renewed in place: stop the cluster, delete {path.parent} and run "
               "`mlplatform cluster up` again for a new CA (clients then need the new `mlplatform cluster env`).")
    else:
        how = (f"run `mlplatform cluster certs renew --name {cluster}`, then restart the cluster "
               f"(`mlplatform cluster down --name {cluster}` and `up`) if it is running.")
    raise CertificateError(f"Certificate {path} of cluster '{cluster}' {state} ({when}); {how}")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    # P-256: fast to make (a cluster with many nodes makes one per node) and what gRPC's
    # BoringSSL negotiates natively.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_ca(material: Material, cluster: str, days: int = CA_DAYS) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mlplatform"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"mlplatform cluster {cluster} CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    storage.write_private(material.ca_key, _key_pem(key))
    storage.atomic_write(material.ca_cert, _cert_pem(cert))


def _write_leaf(material: Material, cert_path: Path, key_path: Path, common_name: str, ip: str,
                days: int = LEAF_DAYS) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(material.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(subject_names(ip)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    storage.write_private(key_path, _key_pem(key))
    storage.atomic_write(cert_path, _cert_pem(cert))


def subject_names(ip: str) -> list:
    """SANs of a leaf: gRPC and HTTPS clients check the address they dial against these."""
    from cryptography import x509

    ips = {"127.0.0.1", ip}
    dns = {"localhost", socket.gethostname()}
    return ([x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(ips) if a]
            + [x509.DNSName(d) for d in sorted(dns) if d])


def serve_http_options(material: Material) -> dict[str, str]:
    """Serve's http_options for HTTPS with the cluster's certificates.

    The head node's certificate: the proxy runs there (HeadOnly), and on a local cluster every
    node shares the head's addresses. Serve fixes http_options when it starts, so these must be
    in place on the first deploy or `serve.start` (a later deploy naming others is ignored).
    """
    return {"ssl_certfile": str(material.node_cert("head")), "ssl_keyfile": str(material.node_key("head"))}


def sign_script(ca_dir: str, out_dir: str, ip: str = '"$POD_IP"') -> str:
    """A shell script (openssl) that makes this machine's key and certificate in `out_dir`, signed by
    the CA in `ca_dir`, with the SANs and uses `ensure` gives local nodes. For KubeRay pods (an init
    container) and launcher VMs (a setup command): each signs its own, for its own address (`ip`,
    a shell word)."""
    return (
        f"set -e; cd {out_dir}; "
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout tls.key -out tls.csr "
        "-subj \"/CN=$(hostname)\"; "
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,IP:%s,DNS:%s\\nextendedKeyUsage=serverAuth,clientAuth\\n' "
        f"{ip} \"$(hostname)\" > ext.cnf; "
        f"openssl x509 -req -in tls.csr -CA {ca_dir}/ca.crt -CAkey {ca_dir}/ca.key "
        f"-CAcreateserial -CAserial ca.srl -days {LEAF_DAYS} -sha256 -extfile ext.cnf -out tls.crt; "
        "chmod 600 tls.key; rm -f tls.csr ext.cnf ca.srl"
    )
