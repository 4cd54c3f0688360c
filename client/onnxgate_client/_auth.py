"""What a client presents to the server: a bearer token, and TLS for ``https://`` and ``grpcs://``.

The token goes out as ``authorization: Bearer <token>`` on every HTTP request and as gRPC
metadata on every call, streams included. ``token=None`` (the default) takes it from the
``ONNXGATE_TOKEN`` environment variable; ``token=""`` sends none even when the variable is set.
The token is kept out of every ``repr`` and error message.

TLS is chosen by the URL scheme. ``ca_file`` (PEM) is the CA that signed the server's
certificate, instead of the system's (HTTP) or gRPC's bundled roots; ``cert_file`` and
``key_file`` (PEM; ``key_file`` may be left out when ``cert_file`` holds the key too) are the
client certificate a server that asks for one (mTLS) gets. The files are read and checked when
the client is made, so a wrong path fails at once rather than at the first call.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc

TOKEN_ENV = "ONNXGATE_TOKEN"
Verify = bool | str | ssl.SSLContext  # httpx's ``verify``: on/off, a CA bundle path, or a context
Metadata = tuple[tuple[str, str], ...]


def resolve_token(token: str | None) -> str:
    """The token to send: ``token``, else ``$ONNXGATE_TOKEN``, stripped; ``""`` when there is none."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    if not isinstance(token, str):
        raise TypeError(f"token must be a string, not {type(token).__name__}")
    token = token.strip()
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        # The token itself is not shown: it may be a real one with a stray character.
        raise ValueError("the token may hold only printable ASCII characters without spaces")
    return token


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {os.fspath(path)}: {exc.strerror or exc}") from None


def _no_password() -> str:
    raise ValueError("encrypted private keys are not supported: give key_file unencrypted")


def _context(verify: Verify, ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """An SSL context that checks the server against ``ca_file`` (or the system's CAs) and
    presents the client certificate; raises ``ValueError`` naming the file that is wrong."""
    if isinstance(verify, ssl.SSLContext):
        raise ValueError("with verify=ssl.SSLContext, load the CA and client certificate into that context")
    cafile = ca_file or (verify if isinstance(verify, str) else None)
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the CA file {cafile}: {exc}") from None
    if verify is False:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cert_file:
        try:
            ctx.load_cert_chain(cert_file, key_file, password=_no_password)
        except (OSError, ssl.SSLError) as exc:
            key = key_file or cert_file
            raise ValueError(f"cannot load the client certificate {cert_file} (key {key}): {exc}") from None
    return ctx


class Credentials:
    """A client's token and TLS material, shared by all its transports. Never shows the token."""

    __slots__ = ("_token", "grpc_credentials", "http_verify")

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None = None,
        verify: Verify = True,
        root_certificates: bytes | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self._token = resolve_token(token)
        ca = os.fspath(ca_file) if ca_file is not None else None
        cert = os.fspath(cert_file) if cert_file is not None else None
        key = os.fspath(key_file) if key_file is not None else None
        if key and not cert:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        if ca and (root_certificates is not None or isinstance(verify, str)):
            raise ValueError("give the CA once: ca_file, or verify= / root_certificates=")
        tls = [u for u in urls if u.startswith(("https://", "grpcs://"))]
        if (ca or cert) and not tls:
            raise ValueError("ca_file, cert_file and key_file are for https:// and grpcs:// endpoints; none is")
        self.http_verify: Verify = verify
        if ca or cert or isinstance(verify, str):  # also checks the files, for gRPC too
            self.http_verify = _context(verify, ca, cert, key)
        self.grpc_credentials: grpc.ChannelCredentials | None = None
        if any(u.startswith("grpcs://") for u in urls):
            roots = _read(ca, "ca_file") if ca else root_certificates
            chain = _read(cert, "cert_file") if cert else None
            private = _read(key or cert, "key_file") if cert else None
            self.grpc_credentials = grpc.ssl_channel_credentials(roots, private, chain)

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def http_headers(self) -> dict[str, str]:
        """The headers every HTTP request carries for authentication."""
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    def grpc_metadata(self) -> Metadata | None:
        """The metadata every gRPC call carries (``None``: nothing to add)."""
        return (("authorization", f"Bearer {self._token}"),) if self._token else None

    def __repr__(self) -> str:
        return f"Credentials(token={'<set>' if self._token else None})"
