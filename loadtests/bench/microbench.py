"""Per-step cost of the gateway's request path, in process, with the gateway's own code.

Builds the benchmark repository, loads it with ``ModelManager`` (as the gateway does) on a uvloop
loop and times, one request at a time, each step between the decoded wire message and the
session: the codecs, validation, the batcher round trip (queue + thread hop + ORT), metrics,
statistics, the whole ``InferenceService.infer``, the whole ASGI ``HttpApp`` call and the gRPC
servicer method (with a stub context). The socket and protocol layers (grpc.aio, uvicorn) are
what the echo servers measure.

    taskset -c 0 python -m loadtests.bench.microbench --model gemm16

Run it pinned like the gateway: the thread hop costs depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _time_sync(fn: Callable[[], Any], n: int) -> float:
    """Median microseconds per call over 5 rounds of ``n`` calls."""
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


async def _time_async(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


async def _cpu_concurrent(fn: Callable[[], Awaitable[Any]], n: int, concurrency: int = 64) -> float:
    """Process CPU microseconds (every thread: the loop and the instance threads) per call,
    median of 5 rounds of ``n`` calls made ``concurrency`` at a time: what a request costs when
    the batcher forms batches, as under load, without the transport."""
    async def client(calls: int) -> None:
        for _ in range(calls):
            await fn()

    rounds = []
    for _ in range(5):
        t0 = time.process_time()
        await asyncio.gather(*(client(n // concurrency) for _ in range(concurrency)))
        rounds.append((time.process_time() - t0) / (n // concurrency * concurrency) * 1e6)
    return statistics.median(rounds)


async def measure(repo: Path, name: str, n: int) -> list[tuple[str, float | None]]:
    """Median microseconds per call of each step, one request at a time."""
    from prometheus_client import CollectorRegistry

    from loadtests.bench import models
    from loadtests.loadgen.payload import Target, TensorSpec, build_payload
    from onnxgate.core.metrics import Metrics
    from onnxgate.core.registry.local import Repository
    from onnxgate.core.service import InferenceService
    from onnxgate.core.serving.manager import ModelManager
    from onnxgate.core.serving.model import LoadOptions
    from onnxgate.frontends import grpc_codec, http_codec
    from onnxgate.frontends.grpc_service import GrpcInferenceServicer
    from onnxgate.frontends.http_app import HttpApp
    from onnxgate_client.pb import grpc_service_pb2 as pb

    spec = models.BY_NAME[name]
    metrics = Metrics(CollectorRegistry())
    manager = ModelManager(Repository(repo), LoadOptions(), metrics=metrics)
    await manager.load_all()
    service = InferenceService(manager, metrics)
    service.ready = True
    ver = manager.get(name)
    model, batcher = ver.model, ver.scheduler
    assert model is not None and batcher is not None
    loop = asyncio.get_running_loop()

    target = Target("grpc://127.0.0.1:1", name, inputs=[TensorSpec("x", "FP32", (spec.in_dim,))], outputs=["y"])
    payload = build_payload(target, target.inputs)
    raw_req = payload.grpc_request
    req_msg = pb.ModelInferRequest.FromString(raw_req)
    request = grpc_codec.decode_infer(req_msg)
    feeds, rows = model.validate(request.inputs)
    response = await service.infer(request)
    body = payload.http_body
    header_len = len(body) - 4 * spec.in_dim
    hreq, binary = http_codec.decode_infer(body, header_len, name, "")
    hresp = await service.infer(hreq)
    x = feeds["x"]

    out: list[tuple[str, float | None]] = []

    def add(label: str, us: float | None, why: str = "") -> None:
        out.append((label, us))
        print(f"{us:9.1f} us  {label}" if us is not None else f"      n/a     {label}: {why}", file=sys.stderr)

    async def step(label: str, make: Callable[[], Any], is_async: bool | str = False) -> None:
        """Time one step; the server code moves, so a step that no longer applies is reported, not fatal."""
        try:
            fn = make()
            if is_async == "cpu":
                add(label, await _cpu_concurrent(fn, max(n, 640)))
            else:
                add(label, await _time_async(fn, n) if is_async else _time_sync(fn, n))
        except Exception as exc:
            add(label, None, f"{type(exc).__name__}: {exc}")

    import queue
    import threading

    jobs: queue.SimpleQueue = queue.SimpleQueue()

    def echo_thread() -> None:
        while (job := jobs.get()) is not None:
            loop.call_soon_threadsafe(job.set_result, None)

    threading.Thread(target=echo_thread, daemon=True).start()

    def hop() -> Callable[[], Awaitable[Any]]:
        def go() -> asyncio.Future:
            future = loop.create_future()
            jobs.put(future)
            return future

        return go

    def metrics_service() -> Callable[[], Any]:
        def fn() -> None:
            metrics.requests.labels(name, "1", "grpc", "success").inc()
            metrics.request_latency.labels(name, "grpc").observe(0.001)

        return fn

    def metrics_batcher() -> Callable[[], Any]:
        def fn() -> None:
            batcher._m_batch.observe(1)
            batcher._m_compute.observe(0.0001)
            batcher._m_queue_wait[1].observe(0.0001)  # by priority level
            batcher._m_depth.set(0)
            batcher._m_depth.set(0)

        return fn

    class _Ctx:
        async def abort(self, code: Any, details: str) -> None:
            raise RuntimeError(details)

        def time_remaining(self) -> float | None:
            return None  # no deadline, as most clients

    servicer = GrpcInferenceServicer(service)
    ctx = _Ctx()

    async def grpc_full() -> bytes:
        return await servicer.ModelInfer(raw_req, ctx)  # bytes in, bytes out

    app = HttpApp(service)
    path = f"/v2/models/{name}/infer"
    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/octet-stream"),
        (b"inference-header-content-length", str(header_len).encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "headers": headers}
    message = {"type": "http.request", "body": body, "more_body": False}

    async def receive() -> dict:
        return message

    async def send(msg: dict) -> None:
        return None

    session = model.sessions[0]
    await step("ORT session.run, batch 1 (direct)", lambda: lambda: session.run(["y"], {"x": x}))
    await step("grpc: ModelInferRequest.FromString", lambda: lambda: pb.ModelInferRequest.FromString(raw_req))
    await step("grpc: grpc_codec.decode_infer", lambda: lambda: grpc_codec.decode_infer(req_msg))
    await step("core: manager.get (version lookup)", lambda: lambda: manager.get(name, ""))
    await step("core: model.validate", lambda: lambda: model.validate(request.inputs))
    await step("grpc: grpc_codec.serialize_infer (the reply)", lambda: lambda: grpc_codec.serialize_infer(response))
    await step("metrics: service (requests.labels().inc, latency.labels().observe)", metrics_service)
    await step("metrics: batcher (3 histogram observes, 2 gauge sets)", metrics_batcher)
    await step("thread hop: loop -> instance thread (no-op) -> loop", hop, True)
    await step(
        "batcher: submit round trip (queue + hop + ORT + result)",
        lambda: lambda: batcher.submit(feeds, rows, ["y"]),
        True,
    )
    await step("core: InferenceService.infer (everything in the core)", lambda: lambda: service.infer(request), True)
    await step(
        "grpc: servicer.ModelInfer (parse + decode + infer + serialize)",
        lambda: lambda: servicer.ModelInfer(raw_req, ctx),
        True,
    )
    for label, fn in (
        ("batcher.submit", lambda: batcher.submit(feeds, rows, ["y"])),
        ("InferenceService.infer", lambda: service.infer(request)),
        ("servicer.ModelInfer", grpc_full),
        ("HttpApp ASGI call", lambda: app(scope, receive, send)),
    ):
        await step(f"CPU per request, 64 in flight: {label}", lambda fn=fn: fn, "cpu")
    await step("http: http_codec.decode_infer", lambda: lambda: http_codec.decode_infer(body, header_len, name, ""))
    await step("http: http_codec.encode_infer", lambda: lambda: http_codec.encode_infer(hresp, hreq, binary))
    await step(
        "http: HttpApp ASGI call (route + decode + infer + encode)", lambda: lambda: app(scope, receive, send), True
    )
    jobs.put(None)
    await manager.close(5)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.microbench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemm16")
    p.add_argument("-n", type=int, default=2000, help="calls per round (5 rounds, median)")
    args = p.parse_args(argv)
    import uvloop

    from loadtests.bench import models

    np.random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        repo = models.build_repository(Path(tmp), (models.BY_NAME[args.model],))
        uvloop.run(measure(repo, args.model, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
