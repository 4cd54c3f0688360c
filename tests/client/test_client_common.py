"""onnxgate_client against real gateways, over both transports: answers, metadata, failover, deadlines.

Most tests are parametrized over gRPC and HTTP; the rest mix the two in one client or check what holds
for either (URL checks, every endpoint down, importing without onnxruntime). gRPC streams are in
test_client_grpc.py; the shared gateways are fixtures in conftest.py."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest

import modelzoo
from client_helpers import url
from gateway import GatewayProcess
from onnxgate_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    Overloaded,
    Unavailable,
    Unsupported,
)
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

TRANSPORTS = ["grpc", "http"]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel does) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


def feeds(rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.RandomState(seed).rand(rows, 16).astype(np.float32)}


def mixed_feeds() -> dict[str, np.ndarray]:
    rng = np.random.RandomState(1)
    return {
        "f32": rng.randn(2, 4).astype(np.float32),
        "i64": rng.randint(-(2**40), 2**40, size=(2, 2)).astype(np.int64),
        "flag": np.array([[True], [False]]),
        "u8": rng.randint(0, 256, size=(2, 3)).astype(np.uint8),
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


TEXT = np.array([["hello"], ["Grüße, мир"], [""], ["MiXeD 123"]], dtype=object)


def text_reference(repo: Path) -> dict[str, np.ndarray]:
    ref = modelzoo.reference_run(repo / "string" / "1" / "model.onnx", {"text": TEXT})
    return {k: np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(v) for k, v in ref.items()}


# -- answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_sync_answers_equal_onnxruntime(pair, repo, kind):
    with Client(url(pair[0], kind), timeout=10) as client:
        x = feeds()
        ref = modelzoo.reference_run(repo / "mlp" / "1" / "model.onnx", x)
        assert_same(client.infer("mlp", x, outputs=["y"]), ref)
        assert_same(client.infer("mlp", x, version=1), ref)
        mixed = mixed_feeds()
        want = modelzoo.reference_run(repo / "mixed_dtypes/1/model.onnx", mixed)
        assert_same(client.infer("mixed_dtypes", mixed), want)
        half = {"x": np.random.RandomState(2).rand(2, 8).astype(np.float16)}
        assert_same(client.infer("fp16", half), modelzoo.reference_run(repo / "fp16/1/model.onnx", half))


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_async_answers_equal_onnxruntime(pair, repo, kind):
    x, mixed = feeds(5, seed=3), mixed_feeds()

    async def main():
        async with AsyncClient(url(pair[0], kind), timeout=10) as client:
            return await asyncio.gather(client.infer("mlp", x, outputs=["y"]), client.infer("mixed_dtypes", mixed))

    got_mlp, got_mixed = asyncio.run(main())
    assert_same(got_mlp, modelzoo.reference_run(repo / "mlp/1/model.onnx", x))
    assert_same(got_mixed, modelzoo.reference_run(repo / "mixed_dtypes/1/model.onnx", mixed))


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_bytes_round_trip(pair, repo, kind):
    want = text_reference(repo)
    with Client(url(pair[0], kind)) as client:
        out = client.infer("string", {"text": TEXT})
    assert out["same"].dtype == object and out["same"].shape == (4, 1)
    assert out["same"].tolist() == want["same"].tolist()
    assert out["upper"].tolist() == want["upper"].tolist()

    async def main():
        async with AsyncClient(url(pair[0], kind)) as client:
            raw = np.array([[s.encode("utf-8")] for s in TEXT.ravel()], dtype=object)  # bytes in, too
            return await client.infer("string", {"text": raw}, outputs=["same"])

    assert asyncio.run(main())["same"].tolist() == want["same"].tolist()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_metadata_health_and_errors(pair, kind):
    with Client(url(pair[0], kind)) as client:
        assert client.live() and client.ready() and client.model_ready("mlp") and client.model_ready("mlp", 1)
        assert "binary_tensor_data" in client.server_metadata()["extensions"]
        meta = client.model_metadata("mlp")
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
        assert client.model_config("mlp")["name"] == "mlp"
        assert {"name": "mlp", "version": "1", "state": "READY"} in client.repository_index()
        stats = client.statistics("mlp")["model_stats"][0]
        assert stats["name"] == "mlp" and isinstance(stats["inference_stats"]["success"]["count"], int)
        with pytest.raises(NotFound) as info:
            client.model_ready("no_such_model")
        assert info.value.status == 404 and info.value.code == "NOT_FOUND"
        with pytest.raises(NotFound):
            client.infer("no_such_model", feeds())
        with pytest.raises(InvalidInput) as bad:
            client.infer("mlp", {"x": np.zeros((2, 3), np.float32)})
        assert bad.value.status == 400 and "x" in bad.value.message


def test_metadata_is_the_same_over_both_transports(pair):
    with Client(url(pair[0], "grpc")) as g, Client(url(pair[0], "http")) as h:
        assert g.model_metadata("mixed_dtypes") == h.model_metadata("mixed_dtypes")
        assert g.server_metadata() == h.server_metadata()
        assert g.repository_index() == h.repository_index()


# -- failover -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_failover_past_a_closed_port(pair, repo, kind, closed_port):
    dead = f"grpc://127.0.0.1:{closed_port}" if kind == "grpc" else f"http://127.0.0.1:{closed_port}"
    x = feeds()
    ref = modelzoo.reference_run(repo / "mlp/1/model.onnx", x)
    with Client([dead, url(pair[0], kind)], timeout=10) as client:
        for _ in range(6):  # round robin starts at the dead endpoint half of the time
            assert_same(client.infer("mlp", x), ref)

    async def main():
        async with AsyncClient([dead, url(pair[0], kind)], timeout=10) as client:
            return await asyncio.gather(*(client.infer("mlp", x) for _ in range(6)))

    for out in asyncio.run(main()):
        assert_same(out, ref)


def test_failover_when_a_gateway_stops(pair, repo):
    x = feeds()
    ref = modelzoo.reference_run(repo / "mlp/1/model.onnx", x)
    doomed = GatewayProcess(repo).start()
    try:
        clients = [Client([url(doomed, k), url(pair[0], k)], timeout=10) for k in TRANSPORTS]

        async def main():
            aclients = [AsyncClient([url(doomed, k), url(pair[0], k)], timeout=10) for k in TRANSPORTS]
            for c in clients + aclients:  # warm every connection to the doomed gateway
                for _ in range(2):
                    out = c.infer("mlp", x)
                    assert_same(await out if asyncio.iscoroutine(out) else out, ref)
            assert await asyncio.to_thread(doomed.stop) == 0
            for c in clients + aclients:
                for _ in range(4):
                    out = c.infer("mlp", x)
                    assert_same(await out if asyncio.iscoroutine(out) else out, ref)
            for c in aclients:
                await c.close()

        asyncio.run(main())
        for c in clients:
            c.close()
    finally:
        doomed.kill()


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_deadline_respected_when_the_endpoint_blackholes(kind, mode, blackhole, closed_port):
    urls = [f"{kind}://127.0.0.1:{closed_port}", f"{kind}://127.0.0.1:{blackhole}"]
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        if mode == "sync":
            with Client(urls) as client:
                client.infer("mlp", feeds(), timeout=1.0)
        else:

            async def main():
                async with AsyncClient(urls) as client:
                    await client.infer("mlp", feeds(), timeout=1.0)

            asyncio.run(main())
    elapsed = time.monotonic() - start
    assert 0.8 < elapsed < 3.0, elapsed


def _fail_counts(pair: tuple[GatewayProcess, GatewayProcess]) -> tuple[int, int]:
    fails = successes = 0
    for gw in pair:
        with Client(url(gw, "http")) as c:
            stats = c.statistics("mlp", 1)["model_stats"][0]["inference_stats"]
            fails += stats["fail"]["count"]
            successes += stats["success"]["count"]
    return fails, successes


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_bad_input_is_never_retried(pair, kind):
    before = _fail_counts(pair)
    with Client([url(pair[0], kind), url(pair[1], kind)]) as client, pytest.raises(InvalidInput):
        client.infer("mlp", {"x": np.zeros((1, 15), np.float32)})
    after = _fail_counts(pair)
    assert after[0] - before[0] == 1  # exactly one gateway saw it, once
    assert after[1] == before[1]


class _Refuser(BaseHTTPRequestHandler):
    """An HTTP replica that is always overloaded (429) or unavailable (503)."""

    status = 429

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"error": "queue full"}'
        self.send_response(self.status)
        self.send_header("Retry-After", "3")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Overloaded(pb_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request, context):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")


@pytest.fixture
def overloaded_replicas() -> Iterator[tuple[str, str]]:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Refuser)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Overloaded(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"grpc://127.0.0.1:{port}", f"http://127.0.0.1:{http.server_address[1]}"
    server.stop(None)
    http.shutdown()
    http.server_close()


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_overloaded_replica_is_skipped(pair, repo, kind, overloaded_replicas):
    busy = overloaded_replicas[TRANSPORTS.index(kind)]
    with Client(busy) as client, pytest.raises(Overloaded) as info:
        client.infer("mlp", feeds())
    assert info.value.status == 429 and info.value.code == "RESOURCE_EXHAUSTED"
    if kind == "http":
        assert info.value.retry_after == 3.0
    x = feeds()
    with Client([busy, url(pair[0], kind)]) as client:
        for _ in range(4):
            assert_same(client.infer("mlp", x), modelzoo.reference_run(repo / "mlp/1/model.onnx", x))


def test_unavailable_when_every_endpoint_is_down(closed_port):
    with Client([f"grpc://127.0.0.1:{closed_port}", f"http://127.0.0.1:{closed_port}"]) as client:
        with pytest.raises(Unavailable):
            client.infer("mlp", feeds(), timeout=5)
        with pytest.raises(Unavailable):
            client.live(timeout=5)


def test_urls_are_checked():
    for bad in ("127.0.0.1:8001", "ftp://host:1", "grpc://"):
        with pytest.raises(ValueError):
            Client(bad)
    with Client("grpc://127.0.0.1:1") as client, pytest.raises(Unsupported):
        client.routes()  # an HTTP-only call on a gRPC-only client


# -- packaging ------------------------------------------------------------------------------


def test_client_imports_and_works_without_onnxruntime(pair):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["onnxruntime"] = None   # any import of onnxruntime now fails
        sys.modules["onnxgate"] = None      # and so does any import of the server package
        import numpy as np
        import onnxgate_client
        from onnxgate_client import Client
        for url in ("{url(pair[0], "grpc")}", "{url(pair[0], "http")}"):
            with Client(url) as c:
                out = c.infer("mlp", {{"x": np.ones((2, 16), np.float32)}})
                assert out["y"].shape == (2, 10)
        assert sys.modules["onnxruntime"] is None
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
