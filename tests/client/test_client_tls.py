"""onnxgate_client against real gateways serving TLS (``https://``, ``grpcs://``) and mTLS, with
tokens: ``ca_file`` to trust the gateway's CA, ``cert_file``/``key_file`` for the client
certificate, over both transports, sync, async and streams. Certificates from tls_helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import auth_helpers
import tls_helpers
from gateway import GatewayProcess
from onnxgate_client import AsyncClient, Client, ConnectionFailed, OnnxgateError, Unauthenticated, Unavailable
from onnxgate_client._auth import TOKEN_ENV

X = {"x": np.random.RandomState(0).rand(2, 16).astype(np.float32)}


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tls_helpers.Pki:
    return tls_helpers.make_pki(tmp_path_factory.mktemp("pki"))


def _tls_gateway(repo: Path, pki: tls_helpers.Pki, tokens: dict[str, str], directory: Path, mtls: bool):
    config = auth_helpers.write_security_config(directory, tokens)
    args = ["--config", str(config), "--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key)]
    if mtls:
        args += ["--tls-client-ca-file", str(pki.ca.cert)]
    return GatewayProcess(repo, args)


@pytest.fixture(scope="module")
def tls_gw(repo, pki, tokens, tmp_path_factory) -> Iterator[GatewayProcess]:
    with _tls_gateway(repo, pki, tokens, tmp_path_factory.mktemp("tls"), mtls=False) as gw:
        yield gw


@pytest.fixture(scope="module")
def mtls_gw(repo, pki, tokens, tmp_path_factory) -> Iterator[GatewayProcess]:
    with _tls_gateway(repo, pki, tokens, tmp_path_factory.mktemp("mtls"), mtls=True) as gw:
        yield gw


def tls_urls(gw: GatewayProcess) -> list[str]:
    return [f"https://{gw.http_url}", f"grpcs://{gw.grpc_url}"]


def check_every_kind_of_call(urls: list[str], **options) -> None:
    """Each endpoint alone: a unary call, metadata, a stream; sync and async."""
    for u in urls:
        with Client(u, timeout=20, **options) as client:
            assert client.infer("mlp", X)["y"].shape == (2, 10), u
            assert client.model_metadata("mlp")["name"] == "mlp"
            assert len(list(client.stream_infer("mlp", [X] * 3))) == 3

    async def main():
        for u in urls:
            async with AsyncClient(u, timeout=20, **options) as client:
                assert (await client.infer("mlp", X))["y"].shape == (2, 10), u
                assert len(await client.infer_many("mlp", [X] * 3)) == 3

    asyncio.run(main())


def test_tls_with_the_gateways_ca(tls_gw, pki, tokens):
    check_every_kind_of_call(tls_urls(tls_gw), ca_file=pki.ca.cert, token=tokens["infer"])
    with Client(tls_urls(tls_gw), ca_file=str(pki.ca.cert), token="") as client, pytest.raises(Unauthenticated):
        client.infer("mlp", X)  # TLS is no token


def test_tls_refuses_a_server_its_ca_did_not_sign(tls_gw, pki, tokens):
    for u in tls_urls(tls_gw):
        with Client(u, ca_file=pki.other_ca.cert, token=tokens["infer"], timeout=10) as client:
            with pytest.raises((ConnectionFailed, Unavailable)) as info:
                client.infer("mlp", X)
            assert tokens["infer"] not in str(info.value)


def test_mtls_with_a_client_certificate(mtls_gw, pki, tokens):
    check_every_kind_of_call(
        tls_urls(mtls_gw), ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key,
        token=tokens["infer"],
    )


def test_mtls_certificate_and_key_in_one_file(mtls_gw, pki, tokens, tmp_path):
    both = tmp_path / "client.pem"
    both.write_bytes(pki.client.cert.read_bytes() + pki.client.key.read_bytes())
    for u in tls_urls(mtls_gw):
        with Client(u, ca_file=pki.ca.cert, cert_file=both, token=tokens["infer"], timeout=20) as client:
            assert client.infer("mlp", X)["y"].shape == (2, 10), u


def test_mtls_without_a_client_certificate(mtls_gw, pki, tokens):
    https, grpcs = tls_urls(mtls_gw)
    with Client(https, ca_file=pki.ca.cert, token=tokens["infer"]) as client:
        assert client.live()  # probes need no certificate
        with pytest.raises(Unauthenticated) as info:  # every other endpoint does
            client.infer("mlp", X)
        assert "certificate" in str(info.value)
    stranger = {"cert_file": pki.stranger.cert, "key_file": pki.stranger.key}  # signed by another CA
    for extra in ({}, stranger):  # grpcio refuses both at the handshake
        client = Client(grpcs, ca_file=pki.ca.cert, token=tokens["infer"], timeout=10, **extra)
        with client, pytest.raises(OnnxgateError):
            client.infer("mlp", X)


def test_tls_options_are_checked_when_the_client_is_made(pki, tmp_path):
    with pytest.raises(ValueError, match="https:// and grpcs://"):
        Client("http://127.0.0.1:1", ca_file=pki.ca.cert)
    with pytest.raises(ValueError, match=r"missing\.pem"):
        Client("https://127.0.0.1:1", ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match=r"missing\.pem"):
        Client("grpcs://127.0.0.1:1", ca_file=pki.ca.cert, cert_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="client certificate"):  # a key that is not the certificate's
        Client("grpcs://127.0.0.1:1", cert_file=pki.client.cert, key_file=pki.stranger.key)
    with pytest.raises(ValueError, match="cert_file"):
        Client("https://127.0.0.1:1", key_file=pki.client.key)
    with pytest.raises(ValueError, match="once"):
        Client("grpcs://127.0.0.1:1", ca_file=pki.ca.cert, root_certificates=pki.ca.cert.read_bytes())
