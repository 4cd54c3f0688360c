"""HTTP transports over httpx: a pooled ``httpx.Client`` / ``httpx.AsyncClient`` per endpoint.

Replies are asked for uncompressed (``Accept-Encoding: identity``): tensors compress poorly and
the CPU is better spent elsewhere. The per-attempt connect timeout is capped at
``connect_timeout`` so that an address that drops packets fails over to the next endpoint
instead of using up the whole deadline.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import TypeVar

import httpx

from onnxgate_client._auth import Credentials
from onnxgate_client._errors import ConnectionFailed, DeadlineExceeded, OnnxgateError, from_http, with_token_hint
from onnxgate_client._ops import HttpCall, Op

T = TypeVar("T")

_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "onnxgate-client"}
_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=60.0)


def _timeout(timeout: float | None, connect_timeout: float) -> httpx.Timeout:
    if timeout is None:
        return httpx.Timeout(None, connect=connect_timeout)
    return httpx.Timeout(timeout, connect=min(timeout, connect_timeout))


def _transport_error(exc: httpx.TransportError, url: str) -> OnnxgateError:
    """Connect timeouts and network errors may go elsewhere; a read that timed out used the deadline."""
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectionFailed(f"connect timed out: {exc}", endpoint=url)
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"no reply in time: {type(exc).__name__}", endpoint=url)
    return ConnectionFailed(f"{type(exc).__name__}: {exc}", endpoint=url)


def _reply(call: HttpCall[T], status: int, headers: Mapping[str, str], body: bytes, url: str, has_token: bool) -> T:
    if call.accept(status):
        return call.parse(status, headers, body)
    message = body.decode("utf-8", "replace")
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            message = doc["error"]
    except ValueError:
        pass
    retry_after = None
    if (raw := headers.get("retry-after")) is not None:
        try:
            retry_after = float(raw)
        except ValueError:
            retry_after = None
    raise with_token_hint(from_http(status, message or f"HTTP {status}", url, retry_after), has_token)


class HttpTransport:
    """A synchronous HTTP endpoint; thread-safe, connections pooled and kept alive.

    Every request carries the credentials' ``Authorization`` header (httpx masks it in reprs).
    """

    kind = "http"

    def __init__(self, base_url: str, credentials: Credentials, *, connect_timeout: float = 5.0) -> None:
        self.url = base_url
        self.connect_timeout = connect_timeout
        self.has_token = credentials.has_token
        headers = {**_HEADERS, **credentials.http_headers()}
        self._client = httpx.Client(
            base_url=base_url, headers=headers, verify=credentials.http_verify, limits=_LIMITS, timeout=None
        )

    def __repr__(self) -> str:
        return f"HttpTransport({self.url!r}, token={'<set>' if self.has_token else None})"

    def execute(self, op: Op[T], timeout: float | None) -> T:
        call = op.http()
        try:
            r = self._client.request(
                call.method,
                call.path,
                content=call.body,
                headers=call.headers,
                timeout=_timeout(timeout, self.connect_timeout),
            )
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.url) from None
        return _reply(call, r.status_code, r.headers, r.content, self.url, self.has_token)

    def close(self) -> None:
        self._client.close()


class AsyncHttpTransport:
    """An asyncio HTTP endpoint; the total time of one attempt is bounded by ``asyncio.timeout``."""

    kind = "http"

    def __init__(self, base_url: str, credentials: Credentials, *, connect_timeout: float = 5.0) -> None:
        self.url = base_url
        self.connect_timeout = connect_timeout
        self.has_token = credentials.has_token
        self._credentials = credentials
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"AsyncHttpTransport({self.url!r}, token={'<set>' if self.has_token else None})"

    def _session(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {**_HEADERS, **self._credentials.http_headers()}
            self._client = httpx.AsyncClient(
                base_url=self.url, headers=headers, verify=self._credentials.http_verify, limits=_LIMITS, timeout=None
            )
        return self._client

    async def execute(self, op: Op[T], timeout: float | None) -> T:
        call = op.http()
        try:
            async with asyncio.timeout(timeout):
                r = await self._session().request(
                    call.method,
                    call.path,
                    content=call.body,
                    headers=call.headers,
                    timeout=_timeout(timeout, self.connect_timeout),
                )
        except httpx.TransportError as exc:
            raise _transport_error(exc, self.url) from None
        except TimeoutError:
            raise DeadlineExceeded(f"no reply within {timeout} s", endpoint=self.url) from None
        return _reply(call, r.status_code, r.headers, r.content, self.url, self.has_token)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
