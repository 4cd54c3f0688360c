"""Test certificates for TLS and mTLS: CAs, a server certificate for 127.0.0.1/localhost, client
certificates, written as PEM files (made with ``cryptography``, from the test extra)."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files (``cert`` holds the certificate alone)."""

    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()

    @property
    def serial(self) -> int:
        return self.certificate.serial_number


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "onnxgate tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Issued(cert_path, key_path, cert, key)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int = 2) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def make_ca(directory: Path, name: str = "test-ca") -> Issued:
    """A self-signed CA (``<name>.crt``, ``<name>.key`` in ``directory``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(name)
    cert = (
        _builder(subject, subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, name, cert, key)


def _leaf(ca: Issued, directory: Path, stem: str, common_name: str, server: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca.certificate.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return _write(directory, stem, builder.sign(ca.private_key, hashes.SHA256()), key)


def make_server_cert(ca: Issued, directory: Path, stem: str = "server", common_name: str = "onnxgate") -> Issued:
    """A server certificate for 127.0.0.1 and localhost (subject alternative names), signed by ``ca``."""
    return _leaf(ca, directory, stem, common_name, server=True)


def make_client_cert(ca: Issued, directory: Path, stem: str = "client", common_name: str = "client") -> Issued:
    """A client certificate (extended key usage clientAuth), signed by ``ca``."""
    return _leaf(ca, directory, stem, common_name, server=False)


@dataclass(frozen=True)
class Pki:
    """Everything the TLS tests use: a CA, a server certificate, a client certificate it signed,
    and a client certificate signed by another CA."""

    ca: Issued
    server: Issued
    client: Issued
    other_ca: Issued
    stranger: Issued  # a client certificate signed by other_ca


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory, "ca")
    other = make_ca(directory, "other-ca")
    return Pki(
        ca=ca,
        server=make_server_cert(ca, directory),
        client=make_client_cert(ca, directory),
        other_ca=other,
        stranger=make_client_cert(other, directory, "stranger", "stranger"),
    )


def client_context(ca: Path, client: Issued | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca`` (with ``client``'s certificate, for mTLS)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


def server_certificate(port: int, ca: Path, host: str = "127.0.0.1") -> x509.Certificate:
    """The certificate a new TLS connection to ``host:port`` is served (verified against ``ca``)."""
    ctx = client_context(ca)
    with socket.create_connection((host, port), timeout=10) as raw, ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
