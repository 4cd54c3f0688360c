"""Deadline benchmark: its load -- open-loop Poisson arrivals with a per-request deadline and
priority, every outcome kept (answered on time, late, refused, timed out), and a closed loop for
the capacity.

Requests are pre-encoded (one per priority level). HTTP gives the gateway its deadline in the
``X-Request-Deadline-Ms`` header and waits for the answer up to ``client_timeout_s`` (10x the
deadline), so a late answer is seen as late; gRPC sets the call deadline itself, so a late answer
is a client-side ``DEADLINE_EXCEEDED``. The HTTP client is an ``asyncio.Protocol`` with
``httptools`` (one request per keep-alive connection at a time, a pool that grows on demand), as
cheap as ``loadtests.loadgen``'s, with the status, ``Retry-After`` and a refusal's message kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

OK, LATE, REFUSED, TIMEOUT, ERROR = "ok", "late", "refused", "timeout", "error"
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SPIN_NS = 1_200_000  # the last part of a wait is spun (loop timers round to about 1 ms)


@dataclass(frozen=True)
class Encoded:
    """One request, pre-encoded for both transports."""

    priority: int  # 0 = no priority parameter
    http: bytes  # request line + headers + body
    grpc: bytes  # serialized ModelInferRequest


def encode(model: str, in_dim: int, host: str, port: int, deadline_ms: float | None, priority: int = 0) -> Encoded:
    """One single-row request for ``model`` (FP32 ``x`` [1, in_dim], binary output)."""
    from onnxgate_client.pb import grpc_service_pb2 as pb

    raw = np.random.default_rng(7).standard_normal((1, in_dim)).astype("<f4").tobytes()
    params: dict[str, Any] = {"binary_data_output": True}
    if priority:
        params["priority"] = priority
    tensor = {"name": "x", "shape": [1, in_dim], "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    doc = {"inputs": [tensor], "parameters": params}
    header = json.dumps(doc, separators=(",", ":")).encode()
    body = header + raw
    head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
    if deadline_ms is not None:
        head += f"X-Request-Deadline-Ms: {deadline_ms:g}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, in_dim])
    req.raw_input_contents.append(raw)
    if priority:
        req.parameters["priority"].int64_param = priority
    return Encoded(priority, head.encode("latin-1") + body, req.SerializeToString())


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.parse_error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.body: list[bytes] = []
        self.retry_after: bytes | None = None
        self.pool: HttpLoad | None = None  # set while the caller gave up waiting (an orphan)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.parse_error:
            self._finish("http:parse_error")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._finish("connect:closed")
        if self.pool is not None:
            self.pool.orphans.discard(self)
            self.pool = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"retry-after":
            self.retry_after = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()
        self._finish(self.parser.get_status_code())
        pool, self.pool = self.pool, None
        if pool is not None:  # the late answer to a request the caller gave up on: free again
            pool.orphans.discard(self)
            if not self.closed:
                pool.idle.append(self)

    def _finish(self, result: int | str) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(result)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.body.clear()
        self.retry_after = None
        self.waiter = future
        assert self.transport is not None
        self.transport.write(data)
        return future


class Reply(NamedTuple):
    """What one call got: kind OK, LATE (gRPC only), REFUSED, TIMEOUT or ERROR."""

    kind: str
    detail: str | None = None  # a refusal's message or an error's kind
    says_deadline: bool = False  # a refusal whose message mentions the deadline
    retry_after: bool = False  # a 429 that carried Retry-After


@dataclass
class Record:
    """Every request whose (intended) send time fell in the measured window."""

    kind: list[str] = field(default_factory=list)  # OK | LATE | REFUSED | TIMEOUT | ERROR
    latency_ms: list[float] = field(default_factory=list)  # from the send (the lag apart, below)
    priority: list[int] = field(default_factory=list)
    refusal_deadline: list[bool] = field(default_factory=list)  # a refusal whose message says "deadline"
    refusal_key: list[str] = field(default_factory=list)  # a refusal's masked message ("" otherwise)
    retry_after: int = 0  # refusals that carried Retry-After (HTTP)
    errors: dict[str, int] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)  # refusal messages, numbers masked
    lag_ms: list[float] = field(default_factory=list)  # send time - intended send time
    unanswered: int = 0  # HTTP requests given up on whose answers had still not come 60 s after the run
    connects: int = 0  # HTTP connections opened during the run (the pool was short)

    def add(self, kind: str, latency_ms: float, priority: int, lag_ms: float, deadline: bool = False,
            key: str = "") -> None:
        self.refusal_key.append(key)
        self.kind.append(kind)
        self.latency_ms.append(latency_ms)
        self.priority.append(priority)
        self.refusal_deadline.append(deadline)
        self.lag_ms.append(lag_ms)

    def refusal_message(self, text: str) -> str:
        """Count a refusal's message with its numbers masked; returns the key (capped at 20 keys)."""
        key = _NUMBER.sub("#", " ".join(text.split()))[:160]
        if len(self.messages) >= 20 and key not in self.messages:
            key = "(other)"
        self.messages[key] = self.messages.get(key, 0) + 1
        return key


class HttpLoad:
    """A pool of keep-alive connections to one gateway's HTTP port.

    A request the caller stops waiting for (``timeout_s``) keeps its connection until its answer
    comes (an orphan), then the connection is reused: closing it instead would make the gateway
    accept a new connection for every timeout, on the core it computes on."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Conn] = []
        self.orphans: set[_Conn] = set()
        self.connects = 0  # connections opened (all of them: fill() and on demand)

    async def drain(self, timeout_s: float) -> int:
        """Wait until every orphan's answer came (at most ``timeout_s``); the orphans left."""
        deadline = time.monotonic() + timeout_s
        while self.orphans and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.orphans)

    async def fill(self, count: int) -> None:
        """Open connections until ``count`` are idle (the server may have closed some)."""
        self.idle = [c for c in self.idle if not c.closed]
        while len(self.idle) < count:
            self.idle.append(await self._connect())

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, self.host, self.port)
        self.connects += 1
        return conn

    async def call(self, req: Encoded, deadline_s: float, timeout_s: float) -> Reply:
        """Send ``req`` and wait up to ``timeout_s``; lateness is the caller's to judge."""
        conn = None
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                break
            conn = None
        if conn is None:
            try:
                conn = await self._connect()
            except OSError as exc:
                return Reply(ERROR, "connect:" + type(exc).__name__)
        future = conn.send(req.http)
        timer = asyncio.get_running_loop().call_later(timeout_s, _expire, future, conn, self)
        status = await future
        timer.cancel()
        if status == "timeout":
            return Reply(TIMEOUT)
        reply = Reply(ERROR, status if isinstance(status, str) else f"http:{status}")
        if status == 200:
            reply = Reply(OK)
        elif status == 429:
            text = b"".join(conn.body).decode("utf-8", "replace")
            with contextlib.suppress(ValueError, AttributeError):
                text = str(json.loads(text).get("error", text))
            reply = Reply(REFUSED, text, "deadline" in text.lower(), conn.retry_after is not None)
        if not conn.closed:
            self.idle.append(conn)
        return reply

    async def close(self) -> None:
        for conn in [*self.idle, *self.orphans]:
            conn.close()
        self.idle.clear()
        self.orphans.clear()


def _expire(future: asyncio.Future, conn: _Conn, pool: HttpLoad) -> None:
    if not future.done():
        future.set_result("timeout")
        conn.pool = pool  # busy until its answer comes, then back in the pool
        pool.orphans.add(conn)


class GrpcLoad:
    """grpc.aio unary calls whose deadline is the request's deadline."""

    def __init__(self, host: str, port: int, channels: int = 2) -> None:
        self.target = f"{host}:{port}"
        self.count = channels
        self.calls: list[Any] = []
        self.channels: list[Any] = []
        self.next = 0

    async def open(self, _count: int = 0) -> None:
        import grpc

        self.grpc = grpc
        for _ in range(self.count):
            channel = grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            await asyncio.wait_for(channel.channel_ready(), 30)
            self.channels.append(channel)
            self.calls.append(channel.unary_unary("/inference.GRPCInferenceService/ModelInfer"))

    async def call(self, req: Encoded, deadline_s: float, timeout_s: float) -> Reply:
        """A call with ``deadline_s`` as its gRPC deadline: DEADLINE_EXCEEDED is a late answer."""
        self.next = (self.next + 1) % len(self.calls)
        try:
            await self.calls[self.next](req.grpc, timeout=deadline_s)
        except self.grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == self.grpc.StatusCode.DEADLINE_EXCEEDED:
                return Reply(LATE)
            if code == self.grpc.StatusCode.RESOURCE_EXHAUSTED:
                text = exc.details() or ""
                return Reply(REFUSED, text, "deadline" in text.lower())
            return Reply(ERROR, "grpc:" + code.name)
        return Reply(OK)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def open_loop(
    client: HttpLoad | GrpcLoad,
    requests: Sequence[Encoded],
    weights: Sequence[float],
    rate: float,
    warmup_s: float,
    duration_s: float,
    deadline_s: float,
    timeout_s: float,
    seed: int = 1,
    start_ns: int | None = None,
) -> Record:
    """Poisson arrivals at ``rate`` for ``warmup_s + duration_s``; each picks a request by ``weights``
    (the priority mix), the first at about ``start_ns`` (monotonic). Returns what the requests whose
    arrival fell in the measured window got. Latency runs from the send, which is what the gateway's
    deadline counts from; the client's own lag (send - arrival) is kept apart."""
    loop = asyncio.get_running_loop()
    mono = time.monotonic_ns
    rng = random.Random(seed)
    cum = np.cumsum(np.asarray(weights, float) / sum(weights)).tolist()
    rec = Record()
    tasks: set[asyncio.Task] = set()
    start = start_ns or mono() + 10_000_000
    measure, end = start + int(warmup_s * 1e9), start + int((warmup_s + duration_s) * 1e9)
    deadline_ms = deadline_s * 1e3

    async def one(req: Encoded, intended: int, counted: bool) -> None:
        sent = mono()
        try:
            reply = await client.call(req, deadline_s, timeout_s)
        except Exception as exc:  # a client bug must not end the run; count it
            reply = Reply(ERROR, "client:" + type(exc).__name__)
        latency = (mono() - sent) / 1e6
        if not counted:
            return
        kind = LATE if reply.kind == OK and latency > deadline_ms else reply.kind
        key = ""
        if kind == REFUSED:
            key = rec.refusal_message(reply.detail or "")
            rec.retry_after += reply.retry_after
        elif kind == ERROR and reply.detail is not None:
            rec.errors[reply.detail] = rec.errors.get(reply.detail, 0) + 1
        rec.add(kind, latency, req.priority, (sent - intended) / 1e6, reply.says_deadline, key)

    interval = 1e9 / rate
    next_ns = start + rng.expovariate(1.0) * interval
    connects = client.connects if isinstance(client, HttpLoad) else 0
    gc.collect()
    gc.disable()  # a full collection over thousands of pending tasks stalls the sender for milliseconds
    try:
        await _send_all(loop, one, requests, cum, rng, next_ns, interval, measure, end, tasks)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout_s + 5.0)
        if isinstance(client, HttpLoad):  # the gateway has answered everything before the next run
            rec.unanswered = await client.drain(60.0)
            rec.connects = client.connects - connects
    finally:
        gc.enable()
    return rec


async def _send_all(loop: asyncio.AbstractEventLoop, one: Any, requests: Sequence[Encoded], cum: list[float],
                    rng: random.Random, next_ns: float, interval: float, measure: int, end: int,
                    tasks: set[asyncio.Task]) -> None:
    """The open loop's sender: one task per arrival until ``end`` (the last part of each wait spun)."""
    mono = time.monotonic_ns
    while True:
        now = mono()
        while next_ns <= now:
            intended = int(next_ns)
            if intended >= end:
                break
            pick = rng.random()
            req = requests[next(i for i, c in enumerate(cum) if pick <= c or i == len(cum) - 1)]
            task = loop.create_task(one(req, intended, intended >= measure))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_ns += rng.expovariate(1.0) * interval
        if next_ns >= end:
            break
        wait = next_ns - mono()
        await asyncio.sleep((wait - _SPIN_NS) / 1e9 if wait > _SPIN_NS else 0)


async def closed_loop(client: HttpLoad, req: Encoded, concurrency: int, warmup_s: float, duration_s: float) -> dict:
    """``concurrency`` clients sending back to back (no deadline): answered rows/s in the window."""
    mono = time.monotonic_ns
    start = mono()
    measure, end = start + int(warmup_s * 1e9), start + int((warmup_s + duration_s) * 1e9)
    counts = {"ok": 0, "other": 0}
    latencies: list[float] = []

    async def one_client() -> None:
        while (t0 := mono()) < end:
            kind = (await client.call(req, 60.0, 60.0)).kind
            if t0 >= measure:
                counts["ok" if kind == OK else "other"] += 1
                if kind == OK:
                    latencies.append((mono() - t0) / 1e6)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "rows_per_s": counts["ok"] / duration_s,
        "failed": counts["other"],
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))},
    }
