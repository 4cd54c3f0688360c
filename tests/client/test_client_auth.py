"""onnxgate_client against a real gateway that wants tokens (``secured``: a ``security:`` config
with the digests of ``tokens``), over both transports, sync, async and streams.

The token goes on every call (``ops`` reaches every method: any call sent without it would be
refused); none, or an unknown one, is :class:`Unauthenticated`; a token without the call's scope
is :class:`PermissionDenied`; neither is retried on another endpoint; ``ONNXGATE_TOKEN`` is the
default; the token shows in no repr and no error.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from client_helpers import url
from onnxgate_client import AsyncClient, Client, NotFound, PermissionDenied, Unauthenticated
from onnxgate_client._auth import TOKEN_ENV
from onnxgate_client._errors import NO_TOKEN_HINT

TRANSPORTS = ["grpc", "http"]
X = {"x": np.random.RandomState(0).rand(3, 16).astype(np.float32)}


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch):
    """Tests set ``ONNXGATE_TOKEN`` themselves; one in the caller's environment must not count."""
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def dead(kind: str, port: int) -> str:
    return f"{'grpc' if kind == 'grpc' else 'http'}://127.0.0.1:{port}"


# -- the token on every call ------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_every_call_carries_the_token_sync(secured, tokens, kind):
    with Client(url(secured, kind), token=tokens["ops"], timeout=30) as client:
        assert client.infer("mlp", X)["y"].shape == (3, 10)
        assert client.server_metadata()["name"]
        assert client.model_metadata("mlp")["name"] == "mlp"
        assert client.model_config("mlp")["name"] == "mlp"
        assert client.model_ready("mlp")
        assert client.statistics("mlp")["model_stats"][0]["name"] == "mlp"
        assert {"name": "fp16", "version": "1", "state": "READY"} in client.repository_index()
        client.unload_model("fp16")
        assert not client.model_ready("fp16")
        client.load_model("fp16")
        assert client.model_ready("fp16")
        if kind == "http":  # routes are an HTTP API
            assert client.routes() == []
            with pytest.raises(NotFound):  # authenticated first, then looked up
                client.route_comparison("no_such_route")
        results = list(client.stream_infer("mlp", [X, X, X]))
        assert [r["y"].shape for r in results] == [(3, 10)] * 3


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_every_call_carries_the_token_async(secured, tokens, kind):
    async def main():
        async with AsyncClient(url(secured, kind), token=tokens["ops"], timeout=30) as client:
            assert (await client.infer("mlp", X))["y"].shape == (3, 10)
            assert (await client.model_metadata("mlp"))["name"] == "mlp"
            assert (await client.model_config("mlp"))["name"] == "mlp"
            assert await client.model_ready("mlp")
            assert (await client.server_metadata())["name"]
            assert (await client.statistics())["model_stats"]
            assert await client.repository_index()
            await client.load_model("mlp")  # nothing changed: the same version keeps serving
            if kind == "http":
                assert await client.routes() == []
            return await client.infer_many("mlp", [X] * 5)

    assert [r["y"].shape for r in asyncio.run(main())] == [(3, 10)] * 5


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_health_needs_no_token(secured, kind):
    with Client(url(secured, kind), token="") as client:
        assert client.live() and client.ready()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_token_from_the_environment(secured, tokens, kind, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, f"  {tokens['infer']}\n")  # as `export ONNXGATE_TOKEN=$(cat file)` may leave it
    with Client(url(secured, kind)) as client:
        assert client.infer("mlp", X)["y"].shape == (3, 10)
    with Client(url(secured, kind), token="") as client, pytest.raises(Unauthenticated):  # "" = send none
        client.infer("mlp", X)
    with Client(url(secured, kind), token="unknown") as client, pytest.raises(Unauthenticated):  # the argument wins
        client.infer("mlp", X)


# -- refused: 401 / 403 -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_without_a_token_unauthenticated_with_a_hint(secured, kind):
    with Client(url(secured, kind), token="") as client:
        for call in (lambda: client.infer("mlp", X), client.repository_index, lambda: client.model_metadata("mlp")):
            with pytest.raises(Unauthenticated) as info:
                call()
            err = info.value
            assert (err.status, err.code, err.retriable) == (401, "UNAUTHENTICATED", False), err
            assert NO_TOKEN_HINT in str(err), err
        with pytest.raises(Unauthenticated):
            list(client.stream_infer("mlp", [X]))


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_unknown_token_unauthenticated(secured, tokens, kind):
    wrong = tokens["ops"][:-2] + "xx"
    with Client(url(secured, kind), token=wrong) as client:
        with pytest.raises(Unauthenticated) as info:
            client.infer("mlp", X)
        assert info.value.status == 401 and NO_TOKEN_HINT not in str(info.value)
        assert wrong not in str(info.value) and wrong not in repr(info.value)


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_scopes(secured, tokens, kind):
    with Client(url(secured, kind), token=tokens["infer"]) as client:
        assert client.infer("mlp", X)["y"].shape == (3, 10)
        assert client.model_metadata("mlp")["name"] == "mlp"  # infer opens metadata, config, ready
        assert client.model_config("mlp")["name"] == "mlp" and client.model_ready("mlp")
        with pytest.raises(PermissionDenied) as info:
            client.repository_index()
        err = info.value
        assert (err.status, err.code, err.retriable) == (403, "PERMISSION_DENIED", False), err
        with pytest.raises(PermissionDenied):
            client.statistics()
        with pytest.raises(PermissionDenied):
            client.load_model("mlp")
    with Client(url(secured, kind), token=tokens["read"]) as client:
        assert client.repository_index() and client.statistics()["model_stats"]
        assert client.model_metadata("mlp")["name"] == "mlp"
        with pytest.raises(PermissionDenied):
            client.infer("mlp", X)
        with pytest.raises(PermissionDenied):
            client.unload_model("mlp")
    with Client(url(secured, kind), token=tokens["admin"]) as client:
        client.load_model("mlp")
        with pytest.raises(PermissionDenied):
            client.infer("mlp", X)


def test_async_stream_refusals_keep_the_servers_status(secured, tokens):
    """A refused stream's requests may be written as the server ends the call; grpc.aio then
    replaces the server's status by INTERNAL 'Internal error from Core' (a quarter of the time
    here). The client asks again with an empty stream, so the refusal is never a ServerError."""

    async def main():
        for token, error in [("", Unauthenticated), (tokens["read"], PermissionDenied)] * 10:
            async with AsyncClient(url(secured, "grpc"), token=token) as client:
                with pytest.raises(error):
                    await client.infer_many("mlp", [X] * 4)

    asyncio.run(main())


def test_async_refusals(secured, tokens):
    async def main():
        for kind in TRANSPORTS:
            async with AsyncClient(url(secured, kind), token="") as client:
                with pytest.raises(Unauthenticated) as info:
                    await client.infer("mlp", X)
                assert NO_TOKEN_HINT in str(info.value)
                with pytest.raises(Unauthenticated):
                    await client.infer_many("mlp", [X, X])
            async with AsyncClient(url(secured, kind), token=tokens["read"]) as client:
                with pytest.raises(PermissionDenied):
                    await client.infer("mlp", X)
                with pytest.raises(PermissionDenied):
                    await client.infer_many("mlp", [X, X])

    asyncio.run(main())


def test_stream_refusals_sync(secured, tokens):
    with Client(url(secured, "grpc"), token=tokens["read"]) as client, pytest.raises(PermissionDenied):
        list(client.stream_infer("mlp", [X] * 4))
    with Client(url(secured, "grpc"), token="nope") as client, pytest.raises(Unauthenticated):
        list(client.stream_infer("mlp", [X] * 4))


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_refusals_are_not_failed_over(secured, tokens, kind, closed_port):
    """[secured, dead]: a call starting at ``secured`` that moved on would end at the dead port
    with ConnectionFailed; it ends with the refusal, and ``secured`` is not penalized."""
    for token, error in (("", Unauthenticated), (tokens["read"], PermissionDenied)):
        with Client([url(secured, kind), dead(kind, closed_port)], token=token, timeout=10) as client:
            with pytest.raises(error):
                client.infer("mlp", X)  # a fresh client starts at the first endpoint
            assert all(e.penalized_until == 0.0 for e in client._balancer.endpoints)
        if kind == "grpc":
            urls = [url(secured, kind), dead(kind, closed_port)]
            with Client(urls, token=token, timeout=10) as client, pytest.raises(error):
                list(client.stream_infer("mlp", [X] * 3))

    async def main():
        async with AsyncClient([url(secured, kind), dead(kind, closed_port)], token="", timeout=10) as client:
            with pytest.raises(Unauthenticated):
                await client.infer("mlp", X)

    asyncio.run(main())


# -- the token stays secret -------------------------------------------------------------------


def test_the_token_shows_in_no_repr(secured, tokens):
    token = tokens["ops"]
    urls = [url(secured, "grpc"), url(secured, "http")]
    with Client(urls, token=token) as client:
        client.infer("mlp", X)
        shown = [repr(client), str(client), repr(client._credentials), repr(client._balancer.endpoints)]
        shown += [repr(vars(e.transport).get("_client")) for e in client._balancer.endpoints]
        assert "<set>" in repr(client)
    async_client = AsyncClient(urls, token=token)
    shown += [repr(async_client), repr(async_client._balancer.endpoints)]
    for text in shown:
        assert token not in text, text
    with Client(urls, token="") as anonymous:
        assert "<set>" not in repr(anonymous)


def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it():
    for bad in ("two words", "line\nbreak", "naïve"):
        with pytest.raises(ValueError) as info:
            Client("grpc://127.0.0.1:1", token=bad)
        assert bad not in str(info.value)
