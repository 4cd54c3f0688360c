"""Overload: an open-loop load at three times what a compute-bound model can serve, on both
transports. Every request is answered: a result, or a refusal (HTTP 429 / RESOURCE_EXHAUSTED);
never a 5xx, a dropped connection or a timeout. Memory stays bounded, and once the load stops
the gateway serves every request again."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest

import modelzoo
import swap_helpers as sh
from gateway import GatewayProcess
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

DIM = 2048
CONFIG = """
max_batch_size: 64
dynamic_batching { default_queue_policy { max_queue_size: 32 } }
"""
MEASURE_S = 2.0
OVERLOAD_S = 4.0
FACTOR = 3.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory):
    repo: Path = tmp_path_factory.mktemp("overload")
    # ~270 MFLOP per row: a few hundred rows/s, so that the load generator, sharing the machine,
    # can offer three times that (it could not at a few thousand).
    modelzoo.build_slow(repo, "heavy", dim=DIM, layers=32)
    modelzoo.write_config(repo / "heavy", CONFIG)
    with GatewayProcess(repo) as g:
        yield g


class Traffic:
    """One HTTP session and one gRPC channel; each call returns the status it got."""

    def __init__(self, gw: GatewayProcess) -> None:
        x = np.random.default_rng(0).random((1, DIM), dtype=np.float32)
        self.json = {"inputs": [{"name": "x", "shape": [1, DIM], "datatype": "FP32", "data": x.ravel().tolist()}]}
        self.url = f"http://{gw.http_url}/v2/models/heavy/infer"
        tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, DIM])
        self.message = pb.ModelInferRequest(model_name="heavy", inputs=[tensor], raw_input_contents=[x.tobytes()])
        self.grpc_url = gw.grpc_url

    async def __aenter__(self) -> Traffic:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        self.channel = grpc.aio.insecure_channel(self.grpc_url)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()
        await self.channel.close()

    async def call(self, i: int) -> str:
        try:
            if i % 2:
                await self.stub.ModelInfer(self.message, timeout=60)
                return "ok"
            async with self.http.post(self.url, json=self.json) as reply:
                await reply.read()
                return {200: "ok", 429: "shed"}.get(reply.status, f"http {reply.status}")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return "shed"
            return f"grpc {exc.code().name} {exc.details()}"
        except Exception as exc:  # a dropped connection or a timeout: never acceptable
            return f"failed: {exc!r}"


async def _closed_loop(traffic: Traffic, clients: int, seconds: float) -> tuple[Counter, float]:
    outcomes: Counter = Counter()
    stop = time.monotonic() + seconds

    async def client(k: int) -> None:
        i = k
        while time.monotonic() < stop:
            outcomes[await traffic.call(i)] += 1
            i += clients

    started = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return outcomes, time.monotonic() - started


async def _open_loop(traffic: Traffic, rate: float, seconds: float) -> Counter:
    outcomes: Counter = Counter()
    tasks = []
    start = time.monotonic()
    n = int(rate * seconds)
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(traffic.call(i)))
    for outcome in await asyncio.gather(*tasks):
        outcomes[outcome] += 1
    return outcomes


def test_three_times_capacity_gets_only_answers_and_refusals_then_recovers(gw):
    async def scenario() -> tuple[Counter, Counter, Counter, float]:
        async with Traffic(gw) as traffic:
            measured, elapsed = await _closed_loop(traffic, 16, MEASURE_S)
            capacity = measured["ok"] / elapsed
            overload = await _open_loop(traffic, FACTOR * capacity, OVERLOAD_S)
            recovered, _ = await _closed_loop(traffic, 4, 1.0)
            return measured, overload, recovered, capacity

    rss_before = sh.rss_mb(gw)
    measured, overload, recovered, capacity = asyncio.run(scenario())
    rss_after = sh.rss_mb(gw)
    assert set(measured) == {"ok"}, measured
    assert set(overload) <= {"ok", "shed"}, overload
    assert overload["shed"] > 0, f"no request was shed at {FACTOR}x {capacity:.0f} req/s: {overload}"
    assert overload["ok"] > 0, overload
    assert set(recovered) == {"ok"} and recovered["ok"] > 0, recovered
    # The queue holds at most 32 single-row requests: memory does not follow the offered load.
    assert rss_after < rss_before + 300, (rss_before, rss_after)
    shed = sh.metric(gw, "onnxgate_rejected_requests_total", model="heavy", reason="queue_full")
    assert shed == overload["shed"], (shed, overload)  # every refusal is counted, as what it was
