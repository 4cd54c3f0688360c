"""onnxgate_client's gRPC streams against real gateways: bidirectional streaming, sync and async.

Order kept across hundreds of requests, a failed request taking its place in the results, a stream
surviving its gateway's SIGKILL by moving to another, and the stream API's fallback to windowed unary
calls over HTTP. Tests that run over both transports live in test_client_common.py."""

from __future__ import annotations

import asyncio
import signal
import time

import numpy as np
import pytest

import modelzoo
from client_helpers import url
from gateway import GatewayProcess
from onnxgate_client import AsyncClient, Client, RequestFailed

# -- streams --------------------------------------------------------------------------------


def _stream_inputs(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.RandomState(7)
    return [{"x": rng.rand(1 + i % 3, 16).astype(np.float32)} for i in range(n)]


def _check_stream(results, inputs, repo):
    assert len(results) == len(inputs)
    stacked = np.concatenate([f["x"] for f in inputs])
    want = modelzoo.reference_run(repo / "mlp/1/model.onnx", {"x": stacked})["y"]
    row = 0
    for inp, out in zip(inputs, results, strict=True):
        rows = inp["x"].shape[0]
        np.testing.assert_allclose(out["y"], want[row : row + rows], rtol=1e-5, atol=1e-6)
        row += rows


def test_stream_500_requests_sync(pair, repo):
    inputs = _stream_inputs(500)
    with Client(url(pair[0], "grpc")) as client:
        results = list(client.stream_infer("mlp", iter(inputs), window=32))
    _check_stream(results, inputs, repo)


def test_stream_500_requests_async(pair, repo):
    inputs = _stream_inputs(500)

    async def source():
        for item in inputs:
            yield item

    async def main():
        async with AsyncClient(url(pair[0], "grpc")) as client:
            return await client.infer_many("mlp", source(), window=48)

    _check_stream(asyncio.run(main()), inputs, repo)


def test_stream_failures_take_their_place(pair, repo):
    inputs = _stream_inputs(20)
    inputs[7] = {"x": np.zeros((1, 5), np.float32)}
    with Client(url(pair[0], "grpc")) as client:
        results = client.infer_many("mlp", inputs, return_exceptions=True)
        assert isinstance(results[7], RequestFailed) and results[7].index == 7
        _check_stream(results[:7] + results[8:], inputs[:7] + inputs[8:], repo)
        with pytest.raises(RequestFailed):
            client.infer_many("mlp", inputs)


def _served(gw: GatewayProcess) -> int:
    with Client(url(gw, "http")) as c:
        return c.statistics("mlp", 1)["model_stats"][0]["inference_count"]


def test_stream_survives_its_gateway_dying(pair, repo):
    """SIGKILL mid-stream: a new stream on the other gateway takes every unanswered request.

    (A graceful stop would not do: the draining gateway finishes open streams within its
    drain timeout, so the stream would simply complete there.)"""
    inputs = _stream_inputs(1000)
    doomed = GatewayProcess(repo).start()

    def source():
        for i, item in enumerate(inputs):
            if i == 300:
                doomed.signal(signal.SIGKILL)
            time.sleep(0.0005)
            yield item

    before = _served(pair[0])
    try:
        with Client([url(doomed, "grpc"), url(pair[0], "grpc")]) as client:  # the first stream goes to doomed
            results = list(client.stream_infer("mlp", source(), window=32))
        _check_stream(results, inputs, repo)
        assert _served(pair[0]) - before >= 600
    finally:
        doomed.kill()


def test_stream_fails_over_and_falls_back_to_http(pair, repo, closed_port):
    inputs = _stream_inputs(60)
    with Client([f"grpc://127.0.0.1:{closed_port}", url(pair[1], "grpc")]) as client:
        for _ in range(2):  # the stream starts on each endpoint once
            _check_stream(list(client.stream_infer("mlp", inputs, window=8)), inputs, repo)
    with Client(url(pair[1], "http")) as client:
        _check_stream(client.infer_many("mlp", inputs, window=8), inputs, repo)

    async def main():
        async with AsyncClient(url(pair[1], "http")) as client:
            return await client.infer_many("mlp", inputs, window=8)

    _check_stream(asyncio.run(main()), inputs, repo)
