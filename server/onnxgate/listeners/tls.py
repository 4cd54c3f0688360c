"""TLS for the HTTP and gRPC listeners: the contexts from the server config, reloaded on SIGHUP.

With ``tls_cert_file`` and ``tls_key_file`` both listeners serve TLS only (the metrics port stays
plain). With ``tls_client_ca_file`` as well (mTLS), client certificates signed by that CA are
verified:

- HTTP verifies *optionally* (``ssl.CERT_OPTIONAL``): a presented certificate must verify or the
  handshake fails, an absent one is allowed, so that health probes without a certificate work.
  Each request's ASGI scope carries the standard TLS extension (:func:`asgi_tls_info`, computed
  once per connection), which the front end reads to refuse what needs a certificate.
- gRPC *requires* a verified certificate at the TLS layer (grpcio cannot verify optionally), for
  every method, health included. Probes use HTTP ``/v2/health/*``.

Reload (:meth:`ServerTls.reload`, on SIGHUP): the files are read and checked in a thread, then
take effect for new handshakes only; open connections keep theirs. A reload that fails keeps the
old certificates. HTTP: the listening ``ssl.SSLContext`` stays the one the server was built with,
and after a reload its SNI callback (called for every handshake, SNI or not) moves each new
connection to the context built from the new files. A new context rather than the new chain
loaded into the old one, because loading is not atomic (a handshake between the certificate and
its key would fail) and CAs can only be added to a context, never removed. gRPC: the fetcher of
``grpc.dynamic_ssl_server_credentials``, called before every handshake in grpc's own threads,
returns the new configuration once after a reload and None otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from onnxgate.config import ServerConfig
from onnxgate.errors import ConfigError

log = logging.getLogger("onnxgate")

_TLS_VERSIONS = {"TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# RFC 4514 names of the attributes Python's ssl module reports by OpenSSL's long name
_RFC4514_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The certificate chain, its key and the client CA bundle ("" = no mTLS), as configured."""

    cert: str
    key: str
    client_ca: str = ""

    @classmethod
    def from_config(cls, s: ServerConfig) -> TlsFiles | None:
        """None when TLS is off."""
        return cls(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file) if s.tls_cert_file else None


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """What one read of the files gives: the PEM bytes (for gRPC) and an HTTP context built from
    the same bytes."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None
    context: ssl.SSLContext


def _read(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"server.{key}: cannot read {path!r}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    raise ConfigError("encrypted")


def read_material(files: TlsFiles) -> TlsMaterial:
    """Read and check the files, and build the HTTP context (blocking: call it in a thread).

    Raises :class:`ConfigError` naming the key and the file when one is missing, unreadable, not
    PEM, or when the key is not the certificate's."""
    cert_pem, key_pem = _read("tls_cert_file", files.cert), _read("tls_key_file", files.key)
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise ConfigError(f"server.tls_cert_file: {files.cert!r} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError(f"server.tls_key_file: {files.key!r} holds no PEM private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(files.cert, files.key, password=_no_password)
    except ConfigError:
        raise ConfigError(f"server.tls_key_file: {files.key!r} is encrypted; give an unencrypted key") from None
    except (ssl.SSLError, OSError) as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"server.tls_key_file: {files.key!r} is not the key of server.tls_cert_file {files.cert!r}"
            ) from None
        raise ConfigError(
            f"server.tls_cert_file {files.cert!r} with server.tls_key_file {files.key!r}: cannot load: {exc}"
        ) from None
    ca_pem = None
    if files.client_ca:
        ca_pem = _read("tls_client_ca_file", files.client_ca)
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError):
            raise ConfigError(f"server.tls_client_ca_file: {files.client_ca!r} holds no PEM certificate") from None
        context.verify_mode = ssl.CERT_OPTIONAL  # verified when presented; health needs none
        # No session tickets: a resumed session skips the certificate, and would outlive a reload
        # that removed its CA (the listening context, which holds the ticket keys, stays). TLS 1.2
        # session IDs still resume: Python cannot turn the server's session cache off.
        context.num_tickets = 0
        context.options |= ssl.OP_NO_TICKET
    # The context was loaded from the paths: what gRPC gets must be those very bytes.
    if _read("tls_cert_file", files.cert) != cert_pem or _read("tls_key_file", files.key) != key_pem:
        raise ConfigError(f"server.tls_cert_file {files.cert!r} or its key changed while being read; try again")
    return TlsMaterial(cert_pem, key_pem, ca_pem, context)


def _grpc_config(m: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(m.key_pem, m.cert_pem)], m.ca_pem)


def _escape(value: str) -> str:
    """An attribute value escaped as RFC 4514 says."""
    out = "".join("\\" + c if c in '"+,;<>\\' else "\\00" if c == "\0" else c for c in value)
    if out[:1] in ("#", " "):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def rfc4514_name(subject: Any) -> str:
    """The subject of :meth:`ssl.SSLObject.getpeercert` as an RFC 4514 string (most specific
    attribute first, e.g. ``CN=client,O=Example``)."""
    rdns = ("+".join(f"{_RFC4514_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in reversed(subject))
    return ",".join(rdns)


def asgi_tls_info(ssl_object: ssl.SSLObject, cipher_ids: dict[str, int]) -> dict[str, Any]:
    """The ASGI TLS extension (``scope["extensions"]["tls"]``) of one connection.

    ``client_cert_chain`` holds the client's certificate alone (PEM), empty when none was
    presented; a presented one has been verified (else the handshake failed), so
    ``client_cert_error`` is always None."""
    der = ssl_object.getpeercert(binary_form=True)
    name = None
    chain: list[str] = []
    if der:
        chain.append(ssl.DER_cert_to_PEM_cert(der))
        subject = ssl_object.getpeercert().get("subject")
        name = rfc4514_name(subject) if subject else ""
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": cipher_ids.get(cipher[0]) if cipher else None,
    }


class ServerTls:
    """The TLS state both listeners share, and its reload."""

    def __init__(self, files: TlsFiles, material: TlsMaterial) -> None:
        self.files = files
        self.mtls = bool(files.client_ca)
        self.http_context = material.context  # what the HTTP listener was built with, for good
        self._current = material.context  # what new HTTP handshakes get
        self._grpc_initial = _grpc_config(material)
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        self._grpc_lock = threading.Lock()
        # IANA numbers of the cipher suites by OpenSSL name (the low 16 bits of OpenSSL's id)
        self.cipher_ids = {c["name"]: c["id"] & 0xFFFF for c in material.context.get_ciphers()}

    @classmethod
    def load(cls, s: ServerConfig) -> ServerTls:
        """From the server config (blocking: call it in a thread); raises :class:`ConfigError`."""
        files = TlsFiles.from_config(s)
        if files is None:
            raise ConfigError("server.tls_cert_file is not set")
        return cls(files, read_material(files))

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Server credentials for ``add_secure_port``: a client certificate is required when mTLS."""
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_initial, self._fetch_grpc, require_client_authentication=self.mtls
        )

    def connection_info(self, ssl_object: ssl.SSLObject) -> dict[str, Any]:
        """:func:`asgi_tls_info` of one connection."""
        return asgi_tls_info(ssl_object, self.cipher_ids)

    async def reload(self) -> None:
        """Re-read the files (in a thread); new handshakes use them, open connections keep theirs.
        On any error log it and keep the old certificates."""
        try:
            material = await asyncio.to_thread(read_material, self.files)
        except ConfigError as exc:
            log.error("SIGHUP: TLS certificates not reloaded, keeping the old ones: %s", exc.message)
            return
        self.apply(material)
        log.info(
            "SIGHUP: TLS certificates reloaded from %s%s",
            self.files.cert,
            f" (client CA {self.files.client_ca})" if self.files.client_ca else "",
        )

    def apply(self, material: TlsMaterial) -> None:
        """Make ``material`` what new handshakes use (on the loop)."""
        self._current = material.context
        if self.http_context.sni_callback is None:
            self.http_context.sni_callback = self._switch
        with self._grpc_lock:
            self._grpc_pending = _grpc_config(material)

    def _switch(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self._current
        if context is not current:
            ssl_object.context = current

    def _fetch_grpc(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, before every handshake (in grpc's threads): the new configuration once
        after a reload, else None (no change)."""
        if self._grpc_pending is None:
            return None
        with self._grpc_lock:
            config, self._grpc_pending = self._grpc_pending, None
        return config
