"""Load generator for the Open Inference Protocol (KServe V2): gRPC unary, gRPC stream and HTTP.

Transports (chosen by the ``--url`` scheme):

* ``grpc://H:P`` -- ``ModelInfer`` unary calls over raw ``grpc.aio`` multi-callables fed with a
  pre-serialized request (no per-call protobuf work), or with ``--stream`` one or more
  ``ModelStreamInfer`` streams per process, requests tagged with a unique ``id`` and replies
  matched to them by that ``id``.
* ``http://H:P`` -- ``POST /v2/models/M/infer`` with the binary tensor extension (JSON header +
  raw bytes, ``Inference-Header-Content-Length``), over keep-alive connections. The default
  client is a lean ``asyncio.Protocol`` + ``httptools`` parser (``--http-client raw``); the
  aiohttp client is available for comparison (``--http-client aiohttp``).

Load models:

* **closed loop** (``--concurrency C``): C clients, each sends its next request when its
  previous one finished. Latency = completion - send.
* **open loop** (``--rate R``): requests arrive at a fixed rate (``--arrival constant``) or as a
  Poisson process (``--arrival poisson``), whether or not earlier ones have finished. Latency is
  measured from the **intended** send time, so a stalled server or client shows up as latency
  (no coordinated omission). ``send_lag_ms`` reports how late the client itself was.

A run has a warm-up (``--warmup`` seconds, excluded from every number) followed by the measured
window: ``--duration`` seconds, or exactly ``--requests`` requests. A request belongs to the
window when its (intended) send time does. Load comes from ``--processes`` worker processes,
each running one uvloop event loop; ``--cpus`` pins them.

Output: a table and a JSON document ``{"loadgen": 1, "runs": [RUN, ...]}`` where each RUN has

    url, transport, model, model_version, grpc_mode, http_client, mode ("closed"|"open"),
    concurrency, rate, arrival, batch_size, processes, cpus, warmup_s, duration_s,
    requests_target, elapsed_s, requests, successes, errors, errors_by_kind {kind: count},
    throughput_rps, rows_per_s, offered_rps,
    latency_ms {min, mean, p50, p90, p99, p999, max},
    send_lag_ms {mean, max}, client_cpu_s, client_cpu_cores,
    watched_cpu_cores {pid: cores} (``--watch-pid``), machine_busy_cores

``requests == successes + errors``; errors are keyed ``grpc:<STATUS>``, ``http:<status>``,
``stream:<message>``, ``timeout``, ``connect:<exception>``, ``client_overflow`` (open loop: more
than ``--max-inflight`` requests outstanding, the request was not sent) and ``invalid_response``
(``--validate`` only).

Example::

    python -m loadtests.loadgen --url grpc://127.0.0.1:8001 --model mlp --concurrency 64 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import urllib.request
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"

_NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}

_START_LEAD_S = 0.25  # time the workers get to receive a phase before it starts
_SPIN_NS = 1_200_000  # open loop: the last part of a wait is spun (uvloop timers round to 1 ms)


# ----------------------------------------------------------------------------------------------
# what to send


@dataclass(frozen=True)
class TensorSpec:
    """One input: V2 datatype and per-row dims (without the batch dim when the model batches)."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """``NAME:DATATYPE:DIMS`` with DIMS like ``16`` or ``3x224x224`` (empty = scalar per row)."""
        try:
            name, datatype, dims = text.rsplit(":", 2)
        except ValueError:
            raise ValueError(f"input spec {text!r} is not NAME:DATATYPE:DIMS (e.g. x:FP32:16)") from None
        datatype = datatype.upper()
        if datatype not in _NUMPY:
            raise ValueError(f"input spec {text!r}: datatype must be one of {sorted(_NUMPY)}")
        parts = [p for p in dims.replace(",", "x").split("x") if p.strip()]
        return cls(name, datatype, tuple(int(p) for p in parts))


@dataclass
class Target:
    """The server, model and request to send."""

    url: str
    model: str
    model_version: str = ""
    inputs: list[TensorSpec] = field(default_factory=list)  # empty: ask the server's model metadata
    outputs: list[str] = field(default_factory=list)  # empty: all outputs
    batch_size: int = 1  # rows per request
    batched: bool = True  # the model has a batch dim (first dim of each input)
    grpc_mode: str = "unary"  # "unary" | "stream"
    http_client: str = "raw"  # "raw" | "aiohttp"
    loop: str = "uvloop"  # event loop of the workers: "uvloop" | "asyncio"
    connections: int = 1  # per process: gRPC channels (unary) or streams (stream); HTTP pre-opened
    timeout_s: float = 30.0  # per request
    validate: bool = False  # parse every reply and check its outputs

    @property
    def transport(self) -> str:
        scheme = urlsplit(self.url).scheme.lower()
        if scheme not in ("grpc", "http"):
            raise ValueError(f"url {self.url!r}: scheme must be grpc:// or http://")
        return scheme

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"url {self.url!r} needs a host and a port")
        return parts.hostname, parts.port


@dataclass(frozen=True)
class Payload:
    """Pre-encoded requests; built once in the parent, shipped to every worker."""

    rows: int
    outputs: tuple[str, ...]
    grpc_request: bytes
    http_request: bytes  # request line + headers + body
    http_path: str
    http_headers: tuple[tuple[str, str], ...]
    http_body: bytes


def _random_array(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(_NUMPY[datatype]).newbyteorder("<")
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 8, shape).astype(dtype)


def build_payload(target: Target, inputs: Sequence[TensorSpec]) -> Payload:
    """Encode one request for both transports (random data, fixed seed)."""
    from onnxgate_client.pb import grpc_service_pb2 as pb

    rng = np.random.default_rng(1234)
    rows = target.batch_size if target.batched else 1
    req = pb.ModelInferRequest(model_name=target.model, model_version=target.model_version)
    header_inputs = []
    raws: list[bytes] = []
    for spec in inputs:
        shape = [target.batch_size, *spec.dims] if target.batched else list(spec.dims)
        raw = _random_array(spec.datatype, shape, rng).tobytes()
        req.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        req.raw_input_contents.append(raw)
        raws.append(raw)
        header_inputs.append(
            {"name": spec.name, "shape": shape, "datatype": spec.datatype, "parameters": {"binary_data_size": len(raw)}}
        )
    for name in target.outputs:
        req.outputs.add(name=name)
    doc: dict[str, Any] = {"inputs": header_inputs}
    if target.outputs:
        doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in target.outputs]
    else:
        doc["parameters"] = {"binary_data_output": True}
    header = json.dumps(doc, separators=(",", ":")).encode()
    body = header + b"".join(raws)
    path = f"/v2/models/{quote(target.model, safe='')}"
    if target.model_version:
        path += f"/versions/{quote(target.model_version, safe='')}"
    path += "/infer"
    host, port = target.address
    headers = (
        ("Content-Type", "application/octet-stream"),
        ("Inference-Header-Content-Length", str(len(header))),
    )
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return Payload(
        rows=rows,
        outputs=tuple(target.outputs),
        grpc_request=req.SerializeToString(),
        http_request=head.encode("latin-1") + body,
        http_path=path,
        http_headers=headers,
        http_body=body,
    )


def resolve_inputs(target: Target) -> list[TensorSpec]:
    """The target's inputs, from ``target.inputs`` or else from the server's model metadata."""
    if target.inputs:
        return list(target.inputs)
    if target.transport == "http":
        host, port = target.address
        path = f"/v2/models/{quote(target.model, safe='')}"
        if target.model_version:
            path += f"/versions/{quote(target.model_version, safe='')}"
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as reply:
            meta = json.loads(reply.read())
        tensors = [(t["name"], t["datatype"], list(t["shape"])) for t in meta["inputs"]]
    else:
        import grpc

        from onnxgate_client.pb import grpc_service_pb2 as pb
        from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

        host, port = target.address
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelMetadataRequest(name=target.model, version=target.model_version)
            meta = stub.ModelMetadata(request, timeout=10)
        tensors = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
    specs = []
    for name, datatype, shape in tensors:
        dims = shape[1:] if target.batched and shape and shape[0] == -1 else shape
        if any(d < 0 for d in dims):
            raise ValueError(f"input '{name}' has dynamic dims {shape}; give its shape with --input {name}:DT:DIMS")
        specs.append(TensorSpec(name, datatype, tuple(dims)))
    return specs


# ----------------------------------------------------------------------------------------------
# clients (run inside the worker processes); ``infer()`` returns None on success or an error kind


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_grpc_reply(reply: Any, outputs: tuple[str, ...]) -> str | None:
    if not reply.outputs or len(reply.raw_output_contents) != len(reply.outputs):
        return "invalid_response"
    if outputs and [o.name for o in reply.outputs] != list(outputs):
        return "invalid_response"
    return None


def _check_http_reply(header_length: bytes | None, body: bytes, outputs: tuple[str, ...]) -> str | None:
    try:
        size = int(header_length) if header_length is not None else len(body)
        doc = json.loads(body[:size])
        claimed = sum(int(o.get("parameters", {}).get("binary_data_size", 0)) for o in doc["outputs"])
        names = [o["name"] for o in doc["outputs"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "invalid_response"
    if not names or size + claimed != len(body) or (outputs and names != list(outputs)):
        return "invalid_response"
    return None


class _GrpcUnary:
    def __init__(self, target: Target, payload: Payload) -> None:
        self.target = target
        self.payload = payload
        self.channels: list = []
        self.calls: list = []
        self.next = 0

    async def start(self) -> None:
        import grpc

        from onnxgate_client.pb import grpc_service_pb2 as pb

        self.AioRpcError = grpc.aio.AioRpcError
        self.Reply = pb.ModelInferResponse
        host, port = self.target.address
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        if self.target.connections > 1:
            options.append(("grpc.use_local_subchannel_pool", 1))
        for _ in range(max(1, self.target.connections)):
            channel = grpc.aio.insecure_channel(f"{host}:{port}", options=options)
            await asyncio.wait_for(channel.channel_ready(), 30)
            self.channels.append(channel)
            # No serializers: the pre-encoded request goes out as is and the reply stays bytes.
            self.calls.append(channel.unary_unary(GRPC_INFER))

    async def infer(self) -> str | None:
        calls = self.calls
        if len(calls) == 1:
            call = calls[0]
        else:
            self.next = (self.next + 1) % len(calls)
            call = calls[self.next]
        try:
            reply = await call(self.payload.grpc_request, timeout=self.target.timeout_s or None)
        except self.AioRpcError as exc:
            return "grpc:" + exc.code().name
        if self.target.validate:
            return _check_grpc_reply(self.Reply.FromString(reply), self.payload.outputs)
        return None

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class _GrpcStream:
    """One ModelStreamInfer stream; requests carry an id, replies resolve futures by id."""

    def __init__(self, owner: _GrpcStreams, channel: Any, index: int) -> None:
        self.owner = owner
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.pending: dict[str, asyncio.Future] = {}
        self.prefix = f"{os.getpid():x}.{index}."
        self.seq = 0
        self.closed: str | None = None
        self.call = channel.stream_stream(GRPC_STREAM)(self._requests())
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _requests(self):
        queue = self.queue
        while (msg := await queue.get()) is not None:
            yield msg

    async def _read(self) -> None:
        owner = self.owner
        parse, validate, outputs = owner.Reply.FromString, owner.target.validate, owner.payload.outputs
        pending = self.pending
        reason = "stream:closed"
        try:
            async for data in self.call:
                reply = parse(data)
                future = pending.pop(reply.infer_response.id, None)
                if future is None or future.done():
                    continue
                if reply.error_message:
                    future.set_result("stream:" + _short(reply.error_message))
                elif validate:
                    future.set_result(_check_grpc_reply(reply.infer_response, outputs))
                else:
                    future.set_result(None)
        except owner.AioRpcError as exc:
            reason = "grpc:" + exc.code().name
        except asyncio.CancelledError:
            reason = "stream:cancelled"
        finally:
            self.closed = reason
            for future in pending.values():
                if not future.done():
                    future.set_result(reason)
            pending.clear()

    async def infer(self) -> str | None:
        if self.closed:
            return self.closed
        self.seq += 1
        rid = self.prefix + format(self.seq, "x")
        raw = rid.encode()
        # Field 3 (id) appended to the pre-encoded request: a valid ModelInferRequest with that id.
        msg = self.owner.payload.grpc_request + b"\x1a" + varint(len(raw)) + raw
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending[rid] = future
        self.queue.put_nowait(msg)
        timeout = self.owner.target.timeout_s
        if not timeout:
            return await future
        timer = loop.call_later(timeout, _expire, future, self.pending, rid)
        try:
            return await future
        finally:
            timer.cancel()

    async def close(self) -> None:
        self.queue.put_nowait(None)
        try:
            await asyncio.wait_for(self.reader, 5)
        except (TimeoutError, asyncio.CancelledError):
            self.call.cancel()


def _expire(future: asyncio.Future, pending: dict, key: Any) -> None:
    pending.pop(key, None)
    if not future.done():
        future.set_result("timeout")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _GrpcStreams:
    def __init__(self, target: Target, payload: Payload) -> None:
        self.target = target
        self.payload = payload
        self.channels: list = []
        self.streams: list[_GrpcStream] = []
        self.next = 0

    async def start(self) -> None:
        import grpc

        from onnxgate_client.pb import grpc_service_pb2 as pb

        self.AioRpcError = grpc.aio.AioRpcError
        self.Reply = pb.ModelStreamInferResponse
        host, port = self.target.address
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        channel = grpc.aio.insecure_channel(f"{host}:{port}", options=options)
        await asyncio.wait_for(channel.channel_ready(), 30)
        self.channels.append(channel)
        self.streams = [_GrpcStream(self, channel, i) for i in range(max(1, self.target.connections))]

    async def infer(self) -> str | None:
        streams = self.streams
        if len(streams) == 1:
            return await streams[0].infer()
        self.next = (self.next + 1) % len(streams)
        return await streams[self.next].infer()

    async def close(self) -> None:
        for stream in self.streams:
            await stream.close()
        for channel in self.channels:
            await channel.close()


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time; httptools parses replies."""

    def __init__(self, keep_body: bool) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.ParserError = httptools.HttpParserError
        self.keep_body = keep_body
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.body: list[bytes] = []
        self.header_length: bytes | None = None
        self._last_header = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.ParserError:
            self._fail("http:parse_error")
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail("connect:closed")

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.keep_body and name.lower() == b"inference-header-content-length":
            self.header_length = value

    def on_body(self, body: bytes) -> None:
        if self.keep_body:
            self.body.append(body)

    def on_message_complete(self) -> None:
        waiter, self.waiter = self.waiter, None
        if not self.parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    def _fail(self, kind: str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(kind)

    def send(self, data: bytes) -> asyncio.Future:
        """Write one request; the future resolves to the status code (int) or an error kind."""
        future = asyncio.get_running_loop().create_future()
        if self.closed or self.transport is None:
            future.set_result("connect:closed")
            return future
        if self.keep_body:
            self.body.clear()
            self.header_length = None
        self.waiter = future
        self.transport.write(data)
        return future


class _RawHttp:
    def __init__(self, target: Target, payload: Payload) -> None:
        self.target = target
        self.payload = payload
        self.idle: list[_HttpConnection] = []
        self.all: set[_HttpConnection] = set()

    async def start(self) -> None:
        for _ in range(max(1, self.target.connections)):
            self.idle.append(await self._connect())

    async def _connect(self) -> _HttpConnection:
        host, port = self.target.address
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _HttpConnection(self.target.validate), host, port)
        self.all.add(conn)
        return conn

    async def infer(self) -> str | None:
        idle = self.idle
        conn = None
        while idle:
            conn = idle.pop()
            if not conn.closed:
                break
            self.all.discard(conn)
            conn = None
        if conn is None:
            try:
                conn = await self._connect()
            except OSError as exc:
                return "connect:" + type(exc).__name__
        future = conn.send(self.payload.http_request)
        timeout = self.target.timeout_s
        if timeout:
            timer = asyncio.get_running_loop().call_later(timeout, _expire_http, future, conn)
            status = await future
            timer.cancel()
        else:
            status = await future
        if conn.closed:
            self.all.discard(conn)
        else:
            idle.append(conn)
        if status == 200:
            if self.target.validate:
                return _check_http_reply(conn.header_length, b"".join(conn.body), self.payload.outputs)
            return None
        return status if isinstance(status, str) else f"http:{status}"

    async def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None:
                conn.transport.close()
        self.all.clear()
        self.idle.clear()


def _expire_http(future: asyncio.Future, conn: _HttpConnection) -> None:
    if not future.done():
        future.set_result("timeout")
        conn.closed = True  # a late reply would be taken for the next request's: drop the connection
        if conn.transport is not None:
            conn.transport.close()


class _AiohttpClient:
    def __init__(self, target: Target, payload: Payload) -> None:
        self.target = target
        self.payload = payload
        self.session: Any = None

    async def start(self) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        host, port = self.target.address
        self.url = f"http://{host}:{port}{self.payload.http_path}"
        self.headers = dict(self.payload.http_headers)
        timeout = aiohttp.ClientTimeout(total=self.target.timeout_s or None)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=timeout,
            auto_decompress=False,
            # No Accept-Encoding: the gateway would gzip replies over 1 KiB.
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    async def infer(self) -> str | None:
        try:
            async with self.session.post(self.url, data=self.payload.http_body, headers=self.headers) as reply:
                body = await reply.read()
                status = reply.status
                header_length = reply.headers.get("Inference-Header-Content-Length")
        except TimeoutError:
            return "timeout"
        except self.aiohttp.ClientError as exc:
            return "connect:" + type(exc).__name__
        if status != 200:
            return f"http:{status}"
        if self.target.validate:
            return _check_http_reply(header_length.encode() if header_length else None, body, self.payload.outputs)
        return None

    async def close(self) -> None:
        await self.session.close()


def _make_client(target: Target, payload: Payload) -> Any:
    if target.transport == "grpc":
        return _GrpcStreams(target, payload) if target.grpc_mode == "stream" else _GrpcUnary(target, payload)
    return _AiohttpClient(target, payload) if target.http_client == "aiohttp" else _RawHttp(target, payload)


# ----------------------------------------------------------------------------------------------
# one worker process


class _Recorder:
    """What one worker saw in the measured window."""

    def __init__(self) -> None:
        self.latency_ns = array("q")
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.last_done_ns = 0
        self.lag_sum_ns = 0
        self.lag_max_ns = 0
        self.lag_count = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


async def _call(infer: Callable, mono: Callable[[], int]) -> tuple[str | None, int]:
    try:
        err = await infer()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a client bug must not kill the run; count it
        err = "client:" + type(exc).__name__
    return err, mono()


async def _closed_loop(client: Any, ph: dict, rec: _Recorder) -> None:
    mono = time.monotonic_ns
    measure_ns, end_ns = ph["measure_ns"], ph["end_ns"]
    quota = [ph["requests"]] if ph["requests"] is not None else None
    infer = client.infer
    lat = rec.latency_ns

    async def one_client() -> None:
        while True:
            t0 = mono()
            if end_ns and t0 >= end_ns:
                return
            counted = t0 >= measure_ns
            if counted and quota is not None:
                if quota[0] <= 0:
                    return
                quota[0] -= 1
            err, t1 = await _call(infer, mono)
            if counted:
                if err is None:
                    rec.ok += 1
                    lat.append(t1 - t0)
                else:
                    rec.error(err)
                if t1 > rec.last_done_ns:
                    rec.last_done_ns = t1

    await asyncio.gather(*(one_client() for _ in range(ph["concurrency"])))


async def _open_loop(client: Any, ph: dict, rec: _Recorder) -> None:
    loop = asyncio.get_running_loop()
    mono = time.monotonic_ns
    measure_ns, end_ns = ph["measure_ns"], ph["end_ns"]
    quota = ph["requests"]
    rate = ph["rate"]
    poisson = ph["arrival"] == "poisson"
    rng = random.Random(ph["seed"])
    interval_ns = 1e9 / rate
    max_inflight = ph["max_inflight"]
    infer = client.infer
    lat = rec.latency_ns
    inflight = 0
    tasks: set[asyncio.Task] = set()

    async def one(intended: int, counted: bool) -> None:
        nonlocal inflight
        sent = mono()
        err, done = await _call(infer, mono)
        inflight -= 1
        if counted:
            lag = sent - intended
            rec.lag_sum_ns += lag
            rec.lag_count += 1
            if lag > rec.lag_max_ns:
                rec.lag_max_ns = lag
            if err is None:
                rec.ok += 1
                lat.append(done - intended)
            else:
                rec.error(err)
            if done > rec.last_done_ns:
                rec.last_done_ns = done

    next_ns = float(ph["start_ns"] + ph["offset_ns"])
    if poisson:
        next_ns += rng.expovariate(1.0) * interval_ns
    running = True
    while running:
        now = mono()
        while next_ns <= now:
            intended = int(next_ns)
            if end_ns and intended >= end_ns:
                running = False
                break
            counted = intended >= measure_ns
            if counted and quota is not None:
                if quota <= 0:
                    running = False
                    break
                quota -= 1
            if inflight >= max_inflight:
                if counted:
                    rec.error("client_overflow")
            else:
                inflight += 1
                task = loop.create_task(one(intended, counted))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_ns += rng.expovariate(1.0) * interval_ns if poisson else interval_ns
        if not running:
            break
        wait = next_ns - mono()
        if wait > _SPIN_NS:
            await asyncio.sleep((wait - _SPIN_NS) / 1e9)
        else:
            await asyncio.sleep(0)
    if tasks:
        timeout = (ph["timeout_s"] or 30.0) + 5.0
        _, late = await asyncio.wait(set(tasks), timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            rec.error("timeout")  # at least one; exact count below
            rec.errors["timeout"] += len(late) - 1


async def _run_phase(client: Any, ph: dict) -> dict:
    rec = _Recorder()
    if (ph["mode"] == "closed" and ph["concurrency"] <= 0) or (ph["mode"] == "open" and ph["rate"] <= 0):
        return _worker_result(rec, 0.0, 0)
    await _sleep_until(ph["start_ns"])
    cpu: dict[str, float] = {}

    async def cpu_probe() -> None:
        await _sleep_until(ph["measure_ns"])
        cpu["t0"], cpu["c0"] = time.monotonic(), time.process_time()
        if ph["end_ns"]:
            await _sleep_until(ph["end_ns"])
            cpu["t1"], cpu["c1"] = time.monotonic(), time.process_time()

    probe = asyncio.get_running_loop().create_task(cpu_probe())
    if ph["mode"] == "closed":
        await _closed_loop(client, ph, rec)
    else:
        await _open_loop(client, ph, rec)
    if not probe.done():
        if "t0" in cpu:  # request-count mode: the window ends now
            cpu["t1"], cpu["c1"] = time.monotonic(), time.process_time()
        probe.cancel()
    if "t1" in cpu:
        return _worker_result(rec, cpu["c1"] - cpu["c0"], cpu["t1"] - cpu["t0"])
    return _worker_result(rec, 0.0, 0.0)


def _worker_result(rec: _Recorder, cpu_s: float, cpu_wall_s: float) -> dict:
    return {
        "latency_ns": rec.latency_ns.tobytes(),
        "ok": rec.ok,
        "errors": rec.errors,
        "last_done_ns": rec.last_done_ns,
        "lag_sum_ns": rec.lag_sum_ns,
        "lag_max_ns": rec.lag_max_ns,
        "lag_count": rec.lag_count,
        "cpu_s": cpu_s,
        "cpu_wall_s": cpu_wall_s,
    }


async def _worker(conn: Any, target: Target, payload: Payload) -> None:
    loop = asyncio.get_running_loop()
    client = _make_client(target, payload)
    try:
        await client.start()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            command, arg = await loop.run_in_executor(None, conn.recv)
            if command == "stop":
                break
            conn.send(("result", await _run_phase(client, arg)))
    finally:
        await client.close()


def _worker_main(conn: Any, target: Target, payload: Payload, cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    with contextlib.suppress(EOFError, KeyboardInterrupt, BrokenPipeError):
        if target.loop == "asyncio":
            asyncio.run(_worker(conn, target, payload))
        else:
            import uvloop

            uvloop.run(_worker(conn, target, payload))


# ----------------------------------------------------------------------------------------------
# the parent: phases, workers, results


@dataclass
class Phase:
    """One measured run: closed loop (``concurrency``) or open loop (``rate``)."""

    concurrency: int = 0
    rate: float = 0.0
    arrival: str = "constant"  # open loop: "constant" | "poisson"
    duration_s: float | None = 10.0  # measured window; None when ``requests`` is given
    requests: int | None = None  # exact number of measured requests instead of a duration
    warmup_s: float = 2.0
    max_inflight: int = 10_000  # open loop, per process

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
        if self.requests is not None:
            self.duration_s = None
            if self.requests < 1:
                raise ValueError("requests must be >= 1")
        elif not self.duration_s or self.duration_s <= 0:
            raise ValueError("give a positive duration or a request count")
        if self.arrival not in ("constant", "poisson"):
            raise ValueError("arrival must be constant or poisson")
        if self.warmup_s < 0:
            raise ValueError("warmup must be >= 0")

    @property
    def mode(self) -> str:
        return "closed" if self.concurrency > 0 else "open"


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_s() -> float | None:
    """CPU seconds all cores spent busy (not idle or iowait) since boot."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(values[:8]) - values[3] - values[4]) / _CLK_TCK


class _CpuWatch(threading.Thread):
    """Samples the CPU time of some processes and of the whole machine over the measured window."""

    def __init__(self, pids: Sequence[int], measure_ns: int, end_ns: int) -> None:
        super().__init__(daemon=True)
        self.pids = list(pids)
        self.measure_ns, self.end_ns = measure_ns, end_ns
        self.finish = threading.Event()
        self.result: dict[str, Any] = {}

    def _snapshot(self) -> tuple[float, float | None, list[float | None]]:
        return time.monotonic(), machine_busy_s(), [process_cpu_s(p) for p in self.pids]

    def run(self) -> None:
        wait = (self.measure_ns - time.monotonic_ns()) / 1e9
        if wait > 0 and self.finish.wait(wait):
            return
        t0, m0, p0 = self._snapshot()
        if self.end_ns:
            self.finish.wait(max(0.0, (self.end_ns - time.monotonic_ns()) / 1e9))
        else:
            self.finish.wait()
        t1, m1, p1 = self._snapshot()
        wall = max(1e-9, t1 - t0)
        self.result = {
            "machine_busy_cores": (m1 - m0) / wall if m0 is not None and m1 is not None else None,
            "watched_cpu_cores": {
                str(pid): (b - a) / wall if a is not None and b is not None else None
                for pid, a, b in zip(self.pids, p0, p1, strict=True)
            },
        }

    def stop(self) -> dict[str, Any]:
        self.finish.set()
        self.join(5)
        return self.result


def default_processes(cpus: Sequence[int] | None = None) -> int:
    """One worker process per CPU the workers may run on (at most 4)."""
    count = len(cpus) if cpus else len(os.sched_getaffinity(0))
    return max(1, min(4, count))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class LoadGenerator:
    """Worker processes kept across phases (connections stay open between runs).

    >>> with LoadGenerator(Target("grpc://127.0.0.1:8001", "mlp")) as gen:  # doctest: +SKIP
    ...     result = gen.run(Phase(concurrency=64, duration_s=10))
    """

    def __init__(self, target: Target, processes: int | None = None, cpus: Sequence[int] | None = None) -> None:
        self.target = target
        self.cpus = list(cpus) if cpus else None
        self.processes = processes or default_processes(self.cpus)
        self.inputs = resolve_inputs(target)
        self.payload = build_payload(target, self.inputs)
        ctx = mp.get_context("spawn")
        self._workers: list[tuple[Any, Any]] = []
        try:
            for _ in range(self.processes):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(child, target, self.payload, self.cpus), daemon=True)
                proc.start()
                child.close()
                self._workers.append((proc, parent))
            self.pids = [self._receive(proc, conn, 120, "ready") for proc, conn in self._workers]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _receive(proc: Any, conn: Any, timeout: float, expect: str) -> Any:
        deadline = time.monotonic() + timeout
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"load generator worker {proc.pid} died (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"load generator worker {proc.pid} did not answer within {timeout:.0f} s")
        kind, value = conn.recv()
        if kind != expect:
            raise RuntimeError(f"load generator worker {proc.pid}: {value}")
        return value

    def run(self, phase: Phase, watch_pids: Sequence[int] = ()) -> dict:
        """Run one phase on every worker; returns the merged result (the RUN of the module doc).

        The CPU use of ``watch_pids`` (e.g. the server) over the measured window is reported as
        ``watched_cpu_cores``; ``machine_busy_cores`` is what all cores were busy with meanwhile.
        """
        n = self.processes
        start_ns = time.monotonic_ns() + int(_START_LEAD_S * 1e9)
        measure_ns = start_ns + int(phase.warmup_s * 1e9)
        end_ns = measure_ns + int(phase.duration_s * 1e9) if phase.duration_s else 0
        watch = _CpuWatch(watch_pids, measure_ns, end_ns)
        watch.start()
        conc = _split(phase.concurrency, n) if phase.concurrency else [0] * n
        quotas = _split(phase.requests, n) if phase.requests is not None else [None] * n
        if phase.rate:
            rates = [phase.rate / n] * n
            if phase.requests is not None:
                # Each process sends its share at its rate, so all finish together.
                rates = [phase.rate * q / phase.requests for q in quotas]  # type: ignore[operator]
        else:
            rates = [0.0] * n
        for i, (_, conn) in enumerate(self._workers):
            conn.send(
                (
                    "run",
                    {
                        "mode": phase.mode,
                        "concurrency": conc[i],
                        "rate": rates[i],
                        "arrival": phase.arrival,
                        "offset_ns": int(i * 1e9 / phase.rate) if phase.rate else 0,
                        "seed": i + 1,
                        "start_ns": start_ns,
                        "measure_ns": measure_ns,
                        "end_ns": end_ns,
                        "requests": quotas[i],
                        "timeout_s": self.target.timeout_s,
                        "max_inflight": phase.max_inflight,
                    },
                )
            )
        if phase.duration_s:
            budget = _START_LEAD_S + phase.warmup_s + phase.duration_s + (self.target.timeout_s or 30) + 60
        else:
            budget = 24 * 3600.0
        try:
            parts = [self._receive(proc, conn, budget, "result") for proc, conn in self._workers]
        finally:
            cpu = watch.stop()
        return self._merge(phase, parts, measure_ns, cpu)

    def _merge(self, phase: Phase, parts: list[dict], measure_ns: int, cpu: dict[str, Any]) -> dict:
        lat = np.concatenate([np.frombuffer(p["latency_ns"], dtype=np.int64) for p in parts]) / 1e6
        ok = sum(p["ok"] for p in parts)
        errors: dict[str, int] = {}
        for p in parts:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        n_err = sum(errors.values())
        if phase.duration_s:
            elapsed = phase.duration_s
        else:
            last = max((p["last_done_ns"] for p in parts), default=0)
            elapsed = max(1e-9, (last - measure_ns) / 1e9)
        lag_count = sum(p["lag_count"] for p in parts)
        cpu_s = sum(p["cpu_s"] for p in parts)
        cpu_wall = max((p["cpu_wall_s"] for p in parts), default=0.0)
        t = self.target
        return {
            "url": t.url,
            "transport": t.transport,
            "model": t.model,
            "model_version": t.model_version,
            "grpc_mode": t.grpc_mode if t.transport == "grpc" else None,
            "http_client": t.http_client if t.transport == "http" else None,
            "mode": phase.mode,
            "concurrency": phase.concurrency or None,
            "rate": phase.rate or None,
            "arrival": phase.arrival if phase.rate else None,
            "batch_size": self.payload.rows,
            "processes": self.processes,
            "cpus": self.cpus,
            "warmup_s": phase.warmup_s,
            "duration_s": phase.duration_s,
            "requests_target": phase.requests,
            "elapsed_s": round(elapsed, 6),
            "requests": ok + n_err,
            "successes": ok,
            "errors": n_err,
            "errors_by_kind": dict(sorted(errors.items())),
            "throughput_rps": ok / elapsed,
            "rows_per_s": ok * self.payload.rows / elapsed,
            "offered_rps": phase.rate or None,
            "latency_ms": latency_summary(lat),
            "send_lag_ms": {
                "mean": sum(p["lag_sum_ns"] for p in parts) / lag_count / 1e6 if lag_count else None,
                "max": max(p["lag_max_ns"] for p in parts) / 1e6 if lag_count else None,
            },
            "client_cpu_s": cpu_s,
            "client_cpu_cores": cpu_s / cpu_wall if cpu_wall else None,
            "watched_cpu_cores": cpu.get("watched_cpu_cores", {}),
            "machine_busy_cores": cpu.get("machine_busy_cores"),
        }

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                if proc.is_alive():
                    conn.send(("stop", None))
            except (BrokenPipeError, OSError):
                pass
        for proc, conn in self._workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        self._workers = []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def latency_summary(lat_ms: np.ndarray) -> dict[str, float | None]:
    """min, mean, p50, p90, p99, p99.9 and max of latencies in milliseconds."""
    if lat_ms.size == 0:
        return dict.fromkeys(("min", "mean", "p50", "p90", "p99", "p999", "max"))
    p50, p90, p99, p999 = np.percentile(lat_ms, [50, 90, 99, 99.9])
    return {
        "min": float(lat_ms.min()),
        "mean": float(lat_ms.mean()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "p999": float(p999),
        "max": float(lat_ms.max()),
    }


def run_load(
    target: Target, phases: Sequence[Phase], processes: int | None = None, cpus: Sequence[int] | None = None
) -> list[dict]:
    """Run ``phases`` one after the other with one set of worker processes."""
    with LoadGenerator(target, processes, cpus) as gen:
        return [gen.run(phase) for phase in phases]


# ----------------------------------------------------------------------------------------------
# output


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(runs: Sequence[dict]) -> str:
    """A fixed-width table, one line per run, plus the errors by kind."""
    if not runs:
        return "(no runs)"
    first = runs[0]
    kind = first["transport"] + (f"/{first['grpc_mode']}" if first["grpc_mode"] else f"/{first['http_client']}")
    lines = [
        f"target {first['url']}  model {first['model']}{':' + first['model_version'] if first['model_version'] else ''}"
        f"  {kind}  batch {first['batch_size']}  processes {first['processes']}"
        f"{'  cpus ' + ','.join(map(str, first['cpus'])) if first['cpus'] else ''}",
    ]
    header = (
        f"{'load':>12} {'window_s':>8} {'ok':>8} {'err':>6} {'req/s':>9} {'rows/s':>9} "
        f"{'p50_ms':>8} {'p90_ms':>8} {'p99_ms':>8} {'p99.9_ms':>8} {'max_ms':>8} {'lag_ms':>7} {'cli_cpu':>7} "
        f"{'srv_cpu':>7} {'busy':>5}"
    )
    lines += [header, "-" * len(header)]
    for r in runs:
        load = f"C={r['concurrency']}" if r["mode"] == "closed" else f"R={r['rate']:g}/s"
        lat = r["latency_ms"]
        lines.append(
            f"{load:>12} {r['elapsed_s']:>8.2f} {r['successes']:>8} {r['errors']:>6} {r['throughput_rps']:>9.1f} "
            f"{r['rows_per_s']:>9.1f} {_fmt(lat['p50'], 3):>8} {_fmt(lat['p90'], 3):>8} {_fmt(lat['p99'], 3):>8} "
            f"{_fmt(lat['p999'], 3):>8} {_fmt(lat['max'], 3):>8} {_fmt(r['send_lag_ms']['max'], 2):>7} "
            f"{_fmt(r['client_cpu_cores'], 2):>7} {_fmt(_watched(r), 2):>7} {_fmt(r['machine_busy_cores'], 2):>5}"
        )
    errs = [(r, k, v) for r in runs for k, v in r["errors_by_kind"].items()]
    if errs:
        lines.append("errors:")
        for r, k, v in errs:
            load = f"C={r['concurrency']}" if r["mode"] == "closed" else f"R={r['rate']:g}/s"
            lines.append(f"  {load}: {k} x{v}")
    lines.append(
        "(lag_ms: open loop, worst delay of a send behind its intended time; cli_cpu: cores used by the load"
        " generator; srv_cpu: by the --watch-pid processes; busy: by the whole machine)"
    )
    return "\n".join(lines)


def _watched(run: dict) -> float | None:
    values = [v for v in run.get("watched_cpu_cores", {}).values() if v is not None]
    return sum(values) if values else None


def _cpu_list(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.append(int(part))
    return cpus


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m loadtests.loadgen``."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.loadgen",
        description="Open Inference Protocol load generator (gRPC unary/stream, HTTP binary tensors).",
    )
    p.add_argument("--url", required=True, help="grpc://HOST:PORT or http://HOST:PORT")
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default="")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME:DT:DIMS",
        help="input spec per row, e.g. x:FP32:16 (repeat per input); default: from the model metadata",
    )
    p.add_argument("--output", action="append", default=[], help="output to request (repeat); default: all")
    p.add_argument("--batch-size", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--no-batch-dim", action="store_true", help="the model has no batch dim: send shapes as given")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", help="closed loop: requests in flight; a comma list runs a sweep")
    load.add_argument("--rate", help="open loop: arrivals per second; a comma list runs a sweep")
    p.add_argument("--arrival", choices=["constant", "poisson"], default="constant", help="open-loop arrivals")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--requests", type=int, help="measure exactly this many requests instead of a duration")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds, excluded (default 2)")
    p.add_argument("--processes", type=int, help="worker processes (default: one per usable CPU, at most 4)")
    p.add_argument("--cpus", help="pin the workers to these CPUs, e.g. 1 or 2-3")
    p.add_argument("--stream", action="store_true", help="gRPC: ModelStreamInfer instead of unary ModelInfer")
    p.add_argument("--http-client", choices=["raw", "aiohttp"], default="raw")
    p.add_argument("--connections", type=int, default=1, help="per process: gRPC channels or streams (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (0 = none)")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open loop: outstanding requests per process")
    p.add_argument("--validate", action="store_true", help="parse every reply and check its outputs")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop of the workers")
    p.add_argument(
        "--watch-pid", type=int, action="append", default=[], help="report this process's CPU use (e.g. the server)"
    )
    p.add_argument("--json", dest="json_path", help="also write the JSON document to this file")
    p.add_argument("--format", choices=["table", "json", "both"], default="both", help="what to print on stdout")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0 when every request succeeded, 1 when any failed."""
    args = build_parser().parse_args(argv)
    target = Target(
        url=args.url,
        model=args.model,
        model_version=args.model_version,
        inputs=[TensorSpec.parse(s) for s in args.input],
        outputs=list(args.output),
        batch_size=args.batch_size,
        batched=not args.no_batch_dim,
        grpc_mode="stream" if args.stream else "unary",
        http_client=args.http_client,
        connections=args.connections,
        timeout_s=args.timeout,
        validate=args.validate,
        loop=args.loop,
    )
    target.transport  # noqa: B018 - validates the scheme early
    common = {
        "duration_s": None if args.requests else args.duration,
        "requests": args.requests,
        "warmup_s": args.warmup,
        "max_inflight": args.max_inflight,
    }
    if args.rate:
        phases = [Phase(rate=float(r), arrival=args.arrival, **common) for r in args.rate.split(",")]
    else:
        phases = [Phase(concurrency=int(c), **common) for c in (args.concurrency or "1").split(",")]
    cpus = _cpu_list(args.cpus) if args.cpus else None
    with LoadGenerator(target, args.processes, cpus) as gen:
        runs = [gen.run(phase, args.watch_pid) for phase in phases]
    doc = {"loadgen": 1, "runs": runs}
    text = json.dumps(doc)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
    if args.format in ("table", "both"):
        print(format_table(runs))
    if args.format in ("json", "both"):
        print(text)
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "LoadGenerator",
    "Payload",
    "Phase",
    "Target",
    "TensorSpec",
    "build_parser",
    "build_payload",
    "default_processes",
    "format_table",
    "latency_summary",
    "main",
    "resolve_inputs",
    "run_load",
]
