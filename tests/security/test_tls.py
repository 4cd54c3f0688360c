"""TLS and mTLS on the HTTP and gRPC ports, with real clients (tritonclient over HTTP and gRPC,
the standard library's ssl), and the SIGHUP reload of the certificates.

- TLS (certificate and key): both ports serve TLS only; plain HTTP or gRPC to them fails; the
  metrics port stays plain.
- mTLS (a client CA as well): HTTP verifies a presented client certificate and allows none (health
  probes), and says which in the ASGI scope (``scope["extensions"]["tls"]``); gRPC requires one.
- SIGHUP: new handshakes get the new files, connections opened before keep working; a bad file
  keeps the old certificates.
- Bad files fail the start with exit 2 and a message naming the key and the file, with
  ``--workers N`` too.

The front end's refusal of non-health endpoints without a client certificate is tested with the
endpoint table (tests of the front end), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tritonclient.utils import InferenceServerException

import modelzoo
import tls_helpers
from gateway import GatewayProcess, wait_until
from tls_helpers import Issued, Pki, client_context, server_certificate

ARGS = ["--cpu-threads", "1"]
DIM = 16
RELOADED = "SIGHUP: TLS certificates reloaded"
NOT_RELOADED = "SIGHUP: TLS certificates not reloaded"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return tls_helpers.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("tls_repo")
    modelzoo.build_add_sub(repo, dim=DIM)
    return repo


def tls_args(server: Issued, ca: Path | None = None) -> list[str]:
    args = ["--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key)]
    return [*args, "--tls-client-ca-file", str(ca)] if ca is not None else args


HEADER_TIMEOUT = ["--http-header-timeout-s", "2"]  # bounds the TLS handshake too


@pytest.fixture(scope="module")
def tls_gw(repo: Path, pki: Pki):
    with GatewayProcess(repo, [*ARGS, *HEADER_TIMEOUT, *tls_args(pki.server)]) as gw:
        yield gw


@pytest.fixture(scope="module")
def mtls_gw(repo: Path, pki: Pki):
    with GatewayProcess(repo, [*ARGS, *tls_args(pki.server, pki.ca.cert)]) as gw:
        yield gw


# -- clients ---------------------------------------------------------------------------------------
def _inputs(module, x: np.ndarray, y: np.ndarray) -> list:
    inputs = [module.InferInput("INPUT0", list(x.shape), "FP32"), module.InferInput("INPUT1", list(y.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    return inputs


def _check_add_sub(result) -> None:
    x, y = _xy()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + y)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), x - y)


def _xy() -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(2 * DIM, dtype=np.float32).reshape(2, DIM)
    return x, np.full_like(x, 0.5)


def https_client(gw: GatewayProcess, ca: Path, client: Issued | None = None) -> httpclient.InferenceServerClient:
    options = {"ca_certs": str(ca)}
    if client is not None:
        options |= {"certfile": str(client.cert), "keyfile": str(client.key)}
    return httpclient.InferenceServerClient(gw.http_url, ssl=True, ssl_options=options, network_timeout=30)


def grpcs_client(gw: GatewayProcess, ca: Path, client: Issued | None = None) -> grpcclient.InferenceServerClient:
    keys = {"private_key": str(client.key), "certificate_chain": str(client.cert)} if client is not None else {}
    return grpcclient.InferenceServerClient(gw.grpc_url, ssl=True, root_certificates=str(ca), **keys)


def http_infer(client: httpclient.InferenceServerClient) -> None:
    _check_add_sub(client.infer("add_sub", _inputs(httpclient, *_xy())))


def grpc_infer(client: grpcclient.InferenceServerClient) -> None:
    _check_add_sub(client.infer("add_sub", _inputs(grpcclient, *_xy()), client_timeout=30))


def grpc_code(client: grpcclient.InferenceServerClient) -> str | None:
    """The status of an infer call: None when it succeeded."""
    try:
        grpc_infer(client)
    except InferenceServerException as exc:
        return exc.status()
    finally:
        client.close()
    return None


def https_get(port: int, path: str, ca: Path, client: Issued | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca, client), timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def refused_at_tls(port: int, ca: Path, client: Issued | None = None) -> OSError:
    """The error of a request whose TLS handshake the gateway refuses (in TLS 1.3 the client's
    side of the handshake completes first, so the refusal can show at the first read)."""
    with pytest.raises(OSError) as info:
        https_get(port, "/v2/health/ready", ca, client)
    assert not isinstance(info.value, TimeoutError), info.value
    return info.value


def plain_http_reply(port: int) -> bytes:
    """What a plain-text HTTP request to ``port`` gets back (b"" when the connection just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        try:
            while chunk := sock.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def plain_get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


# -- TLS -------------------------------------------------------------------------------------------
def test_tls_serves_https_and_grpcs_to_real_clients(tls_gw, pki):
    client = https_client(tls_gw, pki.ca.cert)
    try:
        assert client.is_server_ready()
        http_infer(client)
    finally:
        client.close()
    assert grpc_code(grpcs_client(tls_gw, pki.ca.cert)) is None


def test_tls_ports_refuse_plain_text(tls_gw, pki):
    reply = plain_http_reply(tls_gw.http_port)
    assert not reply.startswith(b"HTTP/"), reply[:200]
    plain = grpcclient.InferenceServerClient(tls_gw.grpc_url)
    try:
        with pytest.raises(InferenceServerException) as info:
            plain.is_server_live(client_timeout=30)
        assert info.value.status() == "StatusCode.UNAVAILABLE"
    finally:
        plain.close()


def test_tls_serves_the_configured_certificate_and_metrics_stay_plain(tls_gw, pki):
    assert server_certificate(tls_gw.http_port, pki.ca.cert).serial_number == pki.server.serial
    assert plain_get(tls_gw.metrics_port, "/metrics") == 200


def test_a_stalled_handshake_is_closed_after_the_header_timeout(tls_gw, pki):
    # asyncio would wait 60 s (past this socket's timeout); the header timeout bounds it
    with socket.create_connection(("127.0.0.1", tls_gw.http_port), timeout=30) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(4096) == b""
    assert https_get(tls_gw.http_port, "/v2/health/live", pki.ca.cert)[0] == 200


def test_tls_without_client_ca_takes_no_client_certificate_into_account(tls_gw, pki):
    # no CA: a client certificate, even one from an unknown CA, is neither asked for nor checked
    assert https_get(tls_gw.http_port, "/v2/health/ready", pki.ca.cert, pki.stranger)[0] == 200


# -- mTLS ------------------------------------------------------------------------------------------
def test_mtls_http_verifies_a_presented_certificate_and_allows_none(mtls_gw, pki):
    client = https_client(mtls_gw, pki.ca.cert, pki.client)
    try:
        http_infer(client)
    finally:
        client.close()
    # no certificate: the TLS layer lets it through, so that probes reach health
    assert https_get(mtls_gw.http_port, "/v2/health/ready", pki.ca.cert) == (200, b'{"ready":true}')
    assert https_get(mtls_gw.http_port, "/v2/health/live", pki.ca.cert)[0] == 200
    # a certificate the CA did not sign: the handshake fails
    refused_at_tls(mtls_gw.http_port, pki.ca.cert, pki.stranger)


@pytest.mark.parametrize("path", ["/v2", "/v2/models/stats", "/v2/routes", "/v2/models/nope/config"])
def test_mtls_http_refuses_every_endpoint_but_health_without_a_certificate(mtls_gw, pki, path):
    status, body = https_get(mtls_gw.http_port, path, pki.ca.cert)
    assert status == 401 and b"client certificate" in body, body
    assert https_get(mtls_gw.http_port, path, pki.ca.cert, pki.client)[0] in (200, 404)
    assert https_get(mtls_gw.http_port, "/v2/health/ready", pki.ca.cert)[0] == 200


def resumed(port: int, ca: Path, client: Issued | None) -> bool:
    """Whether a second TLS 1.3 connection resumes the first one's session."""
    ctx = client_context(ca, client)
    session = None
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, ctx.wrap_socket(
            raw, server_hostname="127.0.0.1", session=session
        ) as tls:
            tls.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            while tls.recv(4096):  # the session tickets come after the handshake
                pass
            assert tls.version() == "TLSv1.3"
            reused, session = tls.session_reused, tls.session
    return reused


def test_mtls_resumes_no_session_so_each_connection_shows_its_certificate(tls_gw, mtls_gw, pki):
    assert resumed(tls_gw.http_port, pki.ca.cert, None)  # TLS alone: resumption as usual
    assert not resumed(mtls_gw.http_port, pki.ca.cert, pki.client)
    assert not resumed(mtls_gw.http_port, pki.ca.cert, None)


def test_mtls_grpc_requires_a_certificate_of_the_ca(mtls_gw, pki):
    assert grpc_code(grpcs_client(mtls_gw, pki.ca.cert)) == "StatusCode.UNAVAILABLE"
    assert grpc_code(grpcs_client(mtls_gw, pki.ca.cert, pki.stranger)) == "StatusCode.UNAVAILABLE"
    assert grpc_code(grpcs_client(mtls_gw, pki.ca.cert, pki.client)) is None


def test_asgi_scope_carries_the_tls_extension_once_per_connection(pki, tmp_path):
    """The HTTP listener alone, with a tiny ASGI app recording the scopes it is given."""
    from onnxgate.config import ServerConfig
    from onnxgate.listeners.http_server import HttpServer
    from onnxgate.listeners.https_server import HttpsServer
    from onnxgate.listeners.sockets import listen
    from onnxgate.listeners.tls import ServerTls

    scopes: list[dict] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def two_requests(port: int, ca: Path | None, client: Issued | None) -> None:
        if ca is None:
            conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        else:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca, client), timeout=30)
        try:
            for _ in range(2):  # one keep-alive connection
                conn.request("GET", "/")
                assert conn.getresponse().read() == b""
        finally:
            conn.close()

    async def serve(s: ServerConfig, tls: ServerTls | None, clients: list[Issued | None]) -> None:
        sock = listen("127.0.0.1", 0, 16)
        server = HttpServer(app, s) if tls is None else HttpsServer(app, s, tls)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            assert not task.done()
            await asyncio.sleep(0.01)
        try:
            for client in clients:
                await asyncio.to_thread(two_requests, sock.getsockname()[1], pki.ca.cert if tls else None, client)
        finally:
            server.drain(asyncio.get_running_loop().time() + 5)
            await task

    s = ServerConfig(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                     tls_client_ca_file=str(pki.ca.cert))
    asyncio.run(serve(s, ServerTls.load(s), [pki.client, None]))
    with_cert, _, without, _ = scopes
    assert all(scope["scheme"] == "https" for scope in scopes)
    info = with_cert["extensions"]["tls"]
    assert set(info) == {"server_cert", "client_cert_chain", "client_cert_name", "client_cert_error", "tls_version",
                         "cipher_suite"}
    assert x509.load_pem_x509_certificate(info["client_cert_chain"][0].encode()) == pki.client.certificate
    assert len(info["client_cert_chain"]) == 1
    assert info["client_cert_name"] == pki.client.subject == "CN=client,O=onnxgate tests"
    assert info["client_cert_error"] is None and info["server_cert"] is None
    assert info["tls_version"] == 0x0304
    assert info["cipher_suite"] in (0x1301, 0x1302, 0x1303)
    # computed once per connection: both requests of a connection share it
    assert scopes[1]["extensions"]["tls"] is info
    assert without["extensions"]["tls"] == {**info, "client_cert_chain": [], "client_cert_name": None}
    assert scopes[3]["extensions"]["tls"] is without["extensions"]["tls"]

    # plain HTTP: no TLS extension
    scopes.clear()
    asyncio.run(serve(ServerConfig(), None, [None]))
    assert [scope["scheme"] for scope in scopes] == ["http", "http"]
    assert all("tls" not in scope.get("extensions", {}) for scope in scopes)


# -- SIGHUP ----------------------------------------------------------------------------------------
def _install(src: Issued, cert: Path, key: Path) -> None:
    """Replace the live files (each one whole, as a rename makes it appear)."""
    for source, target in ((src.cert, cert), (src.key, key)):
        tmp = target.with_suffix(".new")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


@pytest.fixture
def live(tmp_path: Path, pki: Pki) -> dict[str, Path]:
    """Copies of the server certificate, its key and the CA that the test may replace."""
    directory = tmp_path / "live"
    directory.mkdir()
    paths = {name: directory / file for name, file in (("cert", "tls.crt"), ("key", "tls.key"), ("ca", "ca.crt"))}
    _install(pki.server, paths["cert"], paths["key"])
    shutil.copyfile(pki.ca.cert, paths["ca"])
    return paths


def _live_args(live: dict[str, Path]) -> list[str]:
    return ["--tls-cert-file", str(live["cert"]), "--tls-key-file", str(live["key"]),
            "--tls-client-ca-file", str(live["ca"])]


def test_sighup_reloads_certificates_and_keeps_open_connections(repo, pki, live, tmp_path):
    renewed_dir = tmp_path / "renewed"
    ca2 = tls_helpers.make_ca(renewed_dir, "ca2")
    server2 = tls_helpers.make_server_cert(ca2, renewed_dir, common_name="onnxgate-renewed")
    client2 = tls_helpers.make_client_cert(ca2, renewed_dir, "client2")
    with GatewayProcess(repo, [*ARGS, *_live_args(live)]) as gw:
        # connections opened before the reload: HTTP keep-alive, and a gRPC channel
        kept = http.client.HTTPSConnection("127.0.0.1", gw.http_port, context=client_context(pki.ca.cert, pki.client),
                                           timeout=30)
        kept.request("GET", "/v2/health/ready")
        response = kept.getresponse()
        assert (response.status, response.read()) == (200, b'{"ready":true}')
        kept_sock = kept.sock
        kept_grpc = grpcs_client(gw, pki.ca.cert, pki.client)
        grpc_infer(kept_grpc)

        # a new certificate from a new CA, and the client CA rotated to it (the old one dropped)
        _install(server2, live["cert"], live["key"])
        shutil.copyfile(ca2.cert, live["ca"])
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: RELOADED in gw.log, timeout=30), gw.log[-3000:]

        # new connections see the new certificate, on both ports
        served = server_certificate(gw.http_port, ca2.cert)
        assert served.serial_number == server2.serial and served.subject == server2.certificate.subject
        assert grpc_code(grpcs_client(gw, ca2.cert, client2)) is None
        client = https_client(gw, ca2.cert, client2)
        try:
            http_infer(client)
        finally:
            client.close()
        # ... and the new client CA only
        refused_at_tls(gw.http_port, ca2.cert, pki.client)
        assert grpc_code(grpcs_client(gw, ca2.cert, pki.client)) == "StatusCode.UNAVAILABLE"

        # the connections opened before go on, on their old certificates
        kept.request("GET", "/v2/health/ready")
        response = kept.getresponse()
        assert (response.status, response.read()) == (200, b'{"ready":true}')
        assert kept.sock is kept_sock
        kept.close()
        try:
            grpc_infer(kept_grpc)
        finally:
            kept_grpc.close()
        assert "Traceback" not in gw.log


def test_sighup_with_a_bad_file_keeps_the_old_certificates(repo, pki, live):
    with GatewayProcess(repo, [*ARGS, *_live_args(live)]) as gw:
        live["cert"].write_text("not a certificate\n")
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: NOT_RELOADED in gw.log, timeout=30), gw.log[-3000:]
        assert "server.tls_cert_file" in gw.log and str(live["cert"]) in gw.log
        # a key that is not the certificate's: refused too
        _install(pki.server, live["cert"], live["key"])
        shutil.copyfile(pki.client.key, live["key"])
        gw.signal(signal.SIGHUP)
        assert wait_until(lambda: gw.log.count(NOT_RELOADED) == 2, timeout=30), gw.log[-3000:]
        assert "is not the key of server.tls_cert_file" in gw.log
        assert RELOADED not in gw.log
        # still serving, with the certificate it started with
        assert server_certificate(gw.http_port, pki.ca.cert).serial_number == pki.server.serial
        assert grpc_code(grpcs_client(gw, pki.ca.cert, pki.client)) is None
        assert https_get(gw.http_port, "/v2/health/ready", pki.ca.cert, pki.client)[0] == 200


# -- bad files at the start ------------------------------------------------------------------------
def _serve(repo: Path, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "onnxgate", "serve", "--host", "127.0.0.1", "--model-repository", str(repo)]
    cmd += ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *ARGS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", ["missing cert", "mismatched key", "encrypted key", "junk ca", "unreadable key"])
def test_bad_tls_files_fail_the_start_clearly(repo, pki, tmp_path, case, workers):
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    cert, key, ca = pki.server.cert, pki.server.key, pki.ca.cert
    if case == "missing cert":
        cert, want = tmp_path / "missing.crt", ("server.tls_cert_file", "missing.crt")
    elif case == "mismatched key":
        key, want = pki.client.key, ("server.tls_key_file", str(pki.client.key))
    elif case == "encrypted key":
        key = tmp_path / "encrypted.key"
        key.write_bytes(pki.server.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ))
        want = ("server.tls_key_file", str(key), "encrypted")
    elif case == "junk ca":
        ca, want = junk, ("server.tls_client_ca_file", str(junk))
    else:
        key = tmp_path / "key-dir"
        key.mkdir()  # reading a directory fails, whoever runs the test (root reads any file)
        want = ("server.tls_key_file", str(key))
    args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-client-ca-file", str(ca)]
    proc = _serve(repo, [*args, "--workers", str(workers)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    message = [line for line in proc.stderr.splitlines() if line.startswith("onnxgate: ")]
    assert message, proc.stderr[-3000:]
    assert all(part in message[0] for part in want), message
    assert "Traceback" not in proc.stderr


# -- --workers N -----------------------------------------------------------------------------------
def test_workers_serve_tls_and_each_reloads_on_sighup(repo, pki, live):
    args = [*ARGS, "--workers", "2", *_live_args(live)]
    with GatewayProcess(repo, args) as gw:
        assert https_get(gw.http_port, "/v2/health/ready", pki.ca.cert) == (200, b'{"ready":true}')
        assert grpc_code(grpcs_client(gw, pki.ca.cert, pki.client)) is None
        assert plain_get(gw.metrics_port, "/metrics") == 200
        gw.signal(signal.SIGHUP)  # forwarded: every worker reloads
        assert wait_until(lambda: gw.log.count(RELOADED) == 2, timeout=30), gw.log[-3000:]
        assert server_certificate(gw.http_port, pki.ca.cert).serial_number == pki.server.serial
