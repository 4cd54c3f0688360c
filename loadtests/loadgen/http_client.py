"""Load generator: HTTP clients (run inside the worker processes), a lean ``asyncio.Protocol`` +
``httptools`` client and an aiohttp one; ``infer()`` returns None on success or an error kind.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from loadtests.loadgen.payload import Payload, Target


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
