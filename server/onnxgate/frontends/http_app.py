"""The HTTP/REST front end: a plain ASGI app over the V2 REST paths.

It reads the raw body itself (the binary tensor extension is not JSON), decodes with
``http_codec``, calls the :class:`InferenceService`, and maps core errors through
``status``. No serving logic lives here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import orjson

from onnxgate.core.admission import INLINE_DECODE_BYTES, Hold
from onnxgate.core.inference import InferRequest, InferResponse, parse_version
from onnxgate.core.service import InferenceService
from onnxgate.errors import GatewayError, InvalidInput, ModelNotFound, Overloaded, PayloadTooLarge, Unsupported
from onnxgate.frontends import http_codec
from onnxgate.frontends.status import CUT_MESSAGE, http_status

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

T = TypeVar("T")

_JSON = [(b"content-type", b"application/json")]
CONTROL_BODY_LIMIT = 4 * 1024 * 1024  # repository and route bodies: small JSON documents


class _Reply:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else _JSON


def _ok(body: bytes = b"") -> _Reply:
    return _Reply(200, body)


def _error(status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> _Reply:
    return _Reply(status, orjson.dumps({"error": message}), _JSON + (extra or []))


class HttpApp:
    """ASGI application serving the Open Inference Protocol REST API."""

    def __init__(self, service: InferenceService, max_body_bytes: int = 1 << 30) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.cut = False  # set by the drain at its deadline: a request it then cancels is answered 503

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            reply = await self._dispatch(scope, receive)
        except asyncio.CancelledError:
            if not self.cut:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            reply = _error(503, CUT_MESSAGE, [(b"connection", b"close")])
        except ClientGone:
            log.debug("client gone before %s %s was answered", scope.get("method"), scope.get("path"))
            return
        except GatewayError as exc:
            extra = None
            if isinstance(exc, Overloaded):
                extra = [(b"retry-after", str(max(1, round(exc.retry_after_s))).encode())]
            reply = _error(http_status(exc), exc.message, extra)
        except Exception:  # the process must survive any request
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            reply = _error(500, "internal error; see the gateway log")
        headers = list(reply.headers)
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _dispatch(self, scope: Scope, receive: Receive) -> _Reply:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        parts = [unquote(p) for p in raw_path.split(b"?", 1)[0].decode("latin-1").split("/")[1:]]
        if parts and parts[-1] == "":
            parts.pop()
        method = scope["method"]
        if not parts or parts[0] != "v2":
            return _error(404, f"no such endpoint: {scope['path']}")
        rest = parts[1:]
        svc = self.service
        if not rest:
            return self._only(method, "GET") or _ok(orjson.dumps(svc.server_metadata()))
        if rest[0] == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
            if bad := self._only(method, "GET"):
                return bad
            ok = svc.live if rest[1] == "live" else (svc.ready and not svc.draining)
            return _ok() if ok else _error(503, f"server is not {rest[1]}")
        if rest[0] == "models":
            return await self._model_route(method, rest[1:], scope, receive)
        if rest[0] == "routes":
            return await self._routes_route(method, rest[1:], receive)
        if rest[0] == "repository":
            return await self._repository_route(method, rest[1:], receive)
        return _error(404, f"no such endpoint: {scope['path']}")

    @staticmethod
    def _only(method: str, allowed: str) -> _Reply | None:
        if method != allowed:
            return _error(405, f"method {method} not allowed; use {allowed}", [(b"allow", allowed.encode())])
        return None

    async def _model_route(self, method: str, rest: list[str], scope: Scope, receive: Receive) -> _Reply:
        svc = self.service
        if rest == ["stats"]:
            return self._only(method, "GET") or _ok(http_codec.stats_json(svc.statistics()))
        if not rest:
            return _error(404, "missing model name")
        name, rest = rest[0], rest[1:]
        version = ""
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
            if parse_version(version) is None:
                raise ModelNotFound(f"unknown version '{version}' of model '{name}': versions are integers")
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        if action == "infer":
            if bad := self._only(method, "POST"):
                return bad
            return await self._infer(name, version, scope, receive)
        if action == "":
            return self._only(method, "GET") or _ok(http_codec.metadata_json(svc.model_metadata(name, version)))
        if action == "ready":
            if bad := self._only(method, "GET"):
                return bad
            if svc.model_ready(name, version):
                return _ok()
            return _error(503, f"model '{name}'" + (f" version {version}" if version else "") + " is not ready")
        if action == "config":
            if bad := self._only(method, "GET"):
                return bad
            return _ok(http_codec.config_json(svc.model_config(name, version)))
        if action == "stats":
            return self._only(method, "GET") or _ok(http_codec.stats_json(svc.statistics(name, version)))
        return _error(404, f"no such endpoint for model '{name}'")

    async def _routes_route(self, method: str, rest: list[str], receive: Receive) -> _Reply:
        """GET /v2/routes; GET|PUT|DELETE /v2/routes/{name}; GET /v2/routes/{name}/comparison."""
        svc = self.service
        if not rest:
            return self._only(method, "GET") or _ok(orjson.dumps([r.to_dict() for r in svc.routes.routes.values()]))
        name = rest[0]
        if rest[1:] == ["comparison"]:
            return self._only(method, "GET") or _ok(orjson.dumps(svc.comparison(name)))
        if len(rest) != 1:
            return _error(404, "no such routes endpoint")
        if method == "GET":
            route = svc.routes.get(name)
            if route is None:
                raise ModelNotFound(f"unknown route '{name}'")
            return _ok(orjson.dumps(route.to_dict()))
        if method == "PUT":
            doc = http_codec.parse_json_object(await self._body(receive, CONTROL_BODY_LIMIT))
            if doc.get("name", name) != name:
                raise InvalidInput(f"route name in the body ({doc.get('name')!r}) differs from the path ('{name}')")
            route = svc.put_route({**doc, "name": name})
            return _ok(orjson.dumps(route.to_dict()))
        if method == "DELETE":
            svc.delete_route(name)
            return _ok()
        return _error(405, f"method {method} not allowed; use GET, PUT or DELETE", [(b"allow", b"GET, PUT, DELETE")])

    async def _repository_route(self, method: str, rest: list[str], receive: Receive) -> _Reply:
        if bad := self._only(method, "POST"):
            return bad
        body = await self._body(receive, CONTROL_BODY_LIMIT)
        svc = self.service
        if rest == ["index"]:
            doc = http_codec.parse_json_object(body)
            return _ok(http_codec.index_json(svc.repository_index(bool(doc.get("ready", False)))))
        if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
            doc = http_codec.parse_json_object(body)
            params = doc.get("parameters") or {}
            if not isinstance(params, dict):
                raise InvalidInput("'parameters' must be an object")
            if rest[2] == "load":
                await svc.load_model(rest[1], params)
            else:
                await svc.unload_model(rest[1])
            return _ok()
        return _error(404, "no such repository endpoint")

    async def _infer(self, name: str, version: str, scope: Scope, receive: Receive) -> _Reply:
        """The model is looked up before the body is read; the body is bounded by what that model
        can accept (413 past it, before reading when Content-Length says so), and read, inflated
        and decoded under the gateway's decode budget."""
        svc = self.service
        headers = dict(scope["headers"])
        label, elements = svc.request_bound(name, version, "http")
        limit = http_codec.body_limit(elements, self.max_body_bytes)
        encoding = headers.get(b"content-encoding")
        if encoding and encoding.strip().lower() not in (b"", b"identity", b"gzip", b"deflate"):
            exc = Unsupported(f"unsupported Content-Encoding '{encoding.decode('latin-1')}'; use gzip or deflate")
            return _error(http_status(exc), exc.message, [(b"accept-encoding", b"gzip, deflate")])  # as Triton
        # A compressed body is at most a hair larger than what it inflates to, which must fit ``limit``.
        wire_limit = min(self.max_body_bytes, limit + limit // 1024 + 1024) if encoding else limit
        length = _header_int(headers, "Content-Length")
        if length is not None and length > wire_limit:
            raise PayloadTooLarge(_too_large(name, length, wire_limit))
        header_length = _header_int(headers, "Inference-Header-Content-Length")
        budget = svc.decode_budget
        # The decode budget is charged as bytes arrive, never for what a client only announces.
        with svc.decoding(label, 0, "http") as hold:
            body = await self._body(receive, wire_limit, hold)
            if encoding:
                text = encoding.decode("latin-1")
                body = await budget.offload(len(body), http_codec.decompress, body, text, limit)
                hold.grow(len(body))  # the inflated body too
            if len(body) < INLINE_DECODE_BYTES:  # the common case, without a coroutine
                request, binary_default = http_codec.decode_infer(body, header_length, name, version)
            else:
                request, binary_default = await budget.offload(
                    len(body), http_codec.decode_infer, body, header_length, name, version
                )
        if self.service.wants_headers:
            request.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        response = await _unless_disconnected(self.service.infer(request), receive)
        accept = headers.get(b"accept-encoding", b"").decode("latin-1")
        if (size := response.nbytes()) < INLINE_DECODE_BYTES:
            return _infer_reply(response, request, binary_default, accept)
        return await budget.offload(size, _infer_reply, response, request, binary_default, accept)

    async def _body(self, receive: Receive, limit: int, hold: Hold | None = None) -> bytes:
        """The whole body, at most ``limit`` bytes (413 past it); ``hold`` grows with each chunk."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise InvalidInput("client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            if hold is not None:
                hold.grow(len(chunk))
            chunks.append(chunk)
            if not message.get("more_body", False):
                if len(chunks) == 1:
                    return chunk
                if hold is not None:
                    hold.grow(size)  # the joined copy, while the chunks still live
                return b"".join(chunks)


def _infer_reply(response: InferResponse, request: InferRequest, binary_default: bool, accept_encoding: str) -> _Reply:
    out, json_length = http_codec.encode_infer(response, request, binary_default)
    reply_headers: list[tuple[bytes, bytes]] = []
    if json_length is None:
        reply_headers.append((b"content-type", b"application/json"))
    else:
        reply_headers.append((b"content-type", b"application/octet-stream"))
        reply_headers.append((b"inference-header-content-length", str(json_length).encode()))
    if accept_encoding:
        out, used = http_codec.compress(out, accept_encoding)
        if used:
            reply_headers.append((b"content-encoding", used.encode()))
    return _Reply(200, out, reply_headers)


def _header_int(headers: dict[bytes, bytes], name: str) -> int | None:
    raw = headers.get(_HEADER_KEYS.get(name) or name.lower().encode())
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isdigit() or len(raw) > 18:
        raise InvalidInput(f"{name} is not a non-negative integer: {raw[:32]!r}")
    return int(raw)


_HEADER_KEYS = {n: n.lower().encode() for n in ("Content-Length", "Inference-Header-Content-Length")}


def _too_large(name: str, size: int, limit: int) -> str:
    return f"request body of {size} bytes exceeds {limit} bytes, the most a valid request for '{name}' needs"


class ClientGone(Exception):
    """The HTTP client closed its connection before the answer was ready."""


async def _unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``, cancelling it (and so taking its request out of any queue) when the
    client disconnects first."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def on_message(watch: asyncio.Task) -> None:
        nonlocal gone
        if not watch.cancelled() and watch.exception() is None and watch.result()["type"] == "http.disconnect":
            gone = True
            task.cancel()

    watch = asyncio.get_running_loop().create_task(receive())
    watch.add_done_callback(on_message)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            raise ClientGone() from None
        raise
    finally:
        watch.remove_done_callback(on_message)
        watch.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
