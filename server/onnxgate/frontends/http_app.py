"""The HTTP/REST front end: a plain ASGI app over the V2 REST paths.

It reads the raw body itself (the binary tensor extension is not JSON), decodes with
``http_codec``, calls the :class:`InferenceService`, and maps core errors through
``status``. No serving logic lives here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import unquote

import orjson

from onnxgate.core.admission import INLINE_DECODE_BYTES, Hold
from onnxgate.core.inference import (
    DEADLINE_HEADER,
    REQUEST_ID_HEADER,
    InferRequest,
    InferResponse,
    deadline_from_header,
    parse_version,
)
from onnxgate.core.security.access import METRICS_REFUSAL, AccessPolicy, Principal
from onnxgate.core.security.audit import AuditLog
from onnxgate.core.security.config import SecurityConfig
from onnxgate.core.service import InferenceService
from onnxgate.errors import (
    GatewayError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from onnxgate.frontends import http_codec, openapi
from onnxgate.frontends.endpoints import ENDPOINTS, Endpoint, HttpRouter
from onnxgate.frontends.http_console import ConsoleHandlers
from onnxgate.frontends.http_reply import (
    CONTROL_BODY_LIMIT,
    JSON,
    Params,
    Receive,
    Reply,
    Scope,
    Send,
    failure,
    ok,
)
from onnxgate.frontends.http_routes import RouteHandlers
from onnxgate.frontends.status import CUT_MESSAGE, http_status

log = logging.getLogger(__name__)

T = TypeVar("T")

_DEADLINE_HEADER = DEADLINE_HEADER.encode()  # as ASGI gives header names: lower-case bytes
_REQUEST_ID_HEADER = REQUEST_ID_HEADER.encode()
_EXCHANGE = "onnxgate.exchange"  # the scope key of an inference request's exchange
_INFER_SPAN = "POST /v2/models/{model}/infer"
_CLIENT_CLOSED = 499  # the access log's status of a request whose client went away (as nginx logs it)


class HttpApp(RouteHandlers, ConsoleHandlers):
    """ASGI application serving the Open Inference Protocol REST API."""

    def __init__(
        self,
        service: InferenceService,
        max_body_bytes: int = 1 << 30,
        access: AccessPolicy | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.access = access if access is not None else AccessPolicy(SecurityConfig(), "127.0.0.1")
        self.audit = audit
        self.cut = False  # set by the drain at its deadline: a request it then cancels is answered 503
        self.router = HttpRouter()
        self._handlers: dict[str, Callable[[Params, Scope, Receive], Awaitable[Reply]]] = {
            e.name: getattr(self, "_" + e.name.replace(".", "_")) if e.implemented else _unsupported(e)
            for e in ENDPOINTS
            if e.http
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        error: BaseException | None = None
        try:
            reply = await self._dispatch(scope, receive)
        except asyncio.CancelledError as exc:
            if not self.cut:
                _finish(scope, _CLIENT_CLOSED, exc)
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            reply, error = failure(503, CUT_MESSAGE, [(b"connection", b"close")]), Unavailable(CUT_MESSAGE)
        except ClientGone as exc:
            log.debug("client gone before %s %s was answered", scope.get("method"), scope.get("path"))
            _finish(scope, _CLIENT_CLOSED, exc)
            return
        except GatewayError as exc:
            error = exc
            extra, reason = None, ""
            if isinstance(exc, Overloaded):  # why it was shed: queue_full, deadline, timeout, ...
                extra, reason = [(b"retry-after", str(max(1, round(exc.retry_after_s))).encode())], exc.reason
            elif isinstance(exc, Unauthenticated):
                extra = [(b"www-authenticate", b"Bearer")]
            reply = failure(http_status(exc), exc.message, extra, reason)
        except Exception as exc:  # the process must survive any request
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            reply, error = failure(500, "internal error; see the gateway log"), exc
        headers = list(reply.headers)
        headers.append((b"content-length", str(len(reply.body)).encode()))
        exchange = scope.get(_EXCHANGE)
        if exchange is not None:
            headers.append((b"x-request-id", exchange.identify("").encode()))
        try:
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            if exchange is not None:
                exchange.finish(reply.status, reply.status, error)
            # error's traceback holds this frame, which holds error: without this the cycle (and the
            # request it reaches: path, headers, body) would wait for the cycle collector
            error = None

    async def _dispatch(self, scope: Scope, receive: Receive) -> Reply:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        parts = [unquote(p) for p in raw_path.split(b"?", 1)[0].decode("latin-1").split("/")[1:]]
        if parts and parts[-1] == "":
            parts.pop()
        found = self.router.match(parts)
        if found is None:
            return failure(404, f"no such endpoint: {scope['path']}")
        methods, params = found
        method = scope["method"]
        endpoint = methods.get(method)
        if endpoint is None:
            allowed = ", ".join(methods)
            return failure(405, f"method {method} not allowed; use {allowed}", [(b"allow", allowed.encode())])
        if "version" in params and parse_version(params["version"]) is None:
            raise ModelNotFound.unknown(params["model"], repr(params["version"]), "versions are integers")
        handler = self._handlers[endpoint.name]
        if endpoint.scope != "admin" and not self.access.guards(endpoint.scope):
            return await handler(params, scope, receive)
        principal = self._check(endpoint, params, scope)
        if endpoint.scope != "admin":
            return await handler(params, scope, receive)
        try:
            reply = await handler(params, scope, receive)
        except GatewayError as exc:
            self._audit(principal.name, endpoint, params, scope, _refusal(exc))
            raise
        except BaseException as exc:  # cut by the drain, or a bug: answered 503 / 500, recorded too
            self._audit(principal.name, endpoint, params, scope, f"not completed: {type(exc).__name__}")
            raise
        self._audit(principal.name, endpoint, params, scope, "ok" if reply.status < 400 else str(reply.status))
        return reply

    def _check(self, endpoint: Endpoint, params: dict[str, str], scope: Scope) -> Principal:
        """The caller, or the refusal (audited for admin endpoints)."""
        authorization = _header(scope, b"authorization")
        tls = (scope.get("extensions") or {}).get("tls") or {}
        try:
            return self.access.check(
                endpoint.scope, endpoint.read_only, authorization, _peer(scope), bool(tls.get("client_cert_chain"))
            )
        except GatewayError as exc:
            if endpoint.scope == "admin" and not isinstance(exc, Overloaded):  # 429s are not recorded one by one
                token = getattr(exc, "token_name", "")
                self._audit(token, endpoint, params, scope, _refusal(exc))
            raise

    def _audit(self, token: str, endpoint: Endpoint, params: dict[str, str], scope: Scope, result: str) -> None:
        if self.audit is not None:
            self.audit.record(token, _peer(scope), endpoint.name, params.get(endpoint.target, ""), result)

    # -- handlers: one per endpoint of ``endpoints.ENDPOINTS`` with HTTP routes ------------------
    # Health answers carry the OIP's bodies ({"live": true}, {"ready": true}); the status says it too.
    async def _health_live(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        if self.service.live:
            return ok(b'{"live":true}')
        return Reply(503, b'{"live":false,"error":"server is not live"}')

    async def _health_ready(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        svc = self.service
        if svc.ready and not svc.draining:
            return ok(b'{"ready":true}')
        return Reply(503, b'{"ready":false,"error":"server is not ready"}')

    async def _server_metadata(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(orjson.dumps(self.service.server_metadata()))

    async def _api_openapi(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(openapi.document_bytes())  # built from the endpoint table once, then the same bytes

    async def _model_metadata(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        meta = self.service.model_metadata(params["model"], params.get("version", ""))
        return ok(http_codec.metadata_json(meta))

    async def _model_ready(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        name, version = params["model"], params.get("version", "")
        if self.service.model_ready(name, version):
            return ok(orjson.dumps({"name": name, "ready": True}))
        message = f"model '{name}'" + (f" version {version}" if version else "") + " is not ready"
        return Reply(503, orjson.dumps({"name": name, "ready": False, "error": message}))

    async def _model_config(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(http_codec.config_json(self.service.model_config(params["model"], params.get("version", ""))))

    async def _model_infer(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return await self._infer(params["model"], params.get("version", ""), scope, receive)

    async def _stats_all(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(http_codec.stats_json(self.service.statistics()))

    async def _stats_model(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        return ok(http_codec.stats_json(self.service.statistics(params["model"], params.get("version", ""))))

    async def _repository_index(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        doc = http_codec.parse_json_object(await self._body(receive, CONTROL_BODY_LIMIT))
        return ok(http_codec.index_json(self.service.repository_index(bool(doc.get("ready", False)))))

    async def _repository_load(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        await self.service.load_model(params["model"], await self._load_parameters(receive))
        return ok()

    async def _repository_unload(self, params: Params, scope: Scope, receive: Receive) -> Reply:
        await self._load_parameters(receive)  # checked, not used
        await self.service.unload_model(params["model"])
        return ok()

    async def _load_parameters(self, receive: Receive) -> dict[str, Any]:
        doc = http_codec.parse_json_object(await self._body(receive, CONTROL_BODY_LIMIT))
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput("'parameters' must be an object")
        return params

    async def _infer(self, name: str, version: str, scope: Scope, receive: Receive) -> Reply:
        """The model is looked up before the body is read; the body is bounded by what that model
        can accept (413 past it, before reading when Content-Length says so), and read, inflated
        and decoded under the gateway's decode budget."""
        received = time.perf_counter_ns()
        svc = self.service
        headers = dict(scope["headers"])
        client_id = headers.get(_REQUEST_ID_HEADER)
        trace = None
        if (tracing := svc.tracing) is not None:
            trace = {
                h: v.decode("latin-1")
                for h, raw in zip(tracing.headers, tracing.raw_headers, strict=True)
                if (v := headers.get(raw)) is not None
            }
        exchange = svc.begin(
            "http", name, client_id.decode("latin-1") if client_id is not None else None, trace, scope.get("client"),
            _INFER_SPAN,
        )
        scope[_EXCHANGE] = exchange  # answered (and ended) in __call__, whatever happens next
        deadline_text = headers.get(_DEADLINE_HEADER)
        deadline = deadline_from_header(deadline_text.decode("latin-1"), received) if deadline_text else 0
        label, elements = svc.request_bound(name, version, "http")
        limit = http_codec.body_limit(elements, self.max_body_bytes)
        encoding = headers.get(b"content-encoding")
        if encoding and encoding.strip().lower() not in (b"", b"identity", b"gzip", b"deflate"):
            exc = Unsupported(f"unsupported Content-Encoding '{encoding.decode('latin-1')}'; use gzip or deflate")
            return failure(http_status(exc), exc.message, [(b"accept-encoding", b"gzip, deflate")])  # as Triton
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
            if header_length == 0:  # a raw binary request: the body is the only input's data
                meta = svc.model_metadata(name, version)
                batched = svc.model_config(name, version).max_batch_size > 0
                request, binary_default = http_codec.decode_raw_request(body, meta.inputs, batched, name, version)
            elif len(body) < INLINE_DECODE_BYTES:  # the common case, without a coroutine
                request, binary_default = http_codec.decode_infer(body, header_length, name, version)
            else:
                request, binary_default = await budget.offload(
                    len(body), http_codec.decode_infer, body, header_length, name, version
                )
        if self.service.wants_headers:
            request.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request.deadline_ns = deadline
        request.exchange = exchange
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
                raise ClientGone()  # nobody to answer: logged 499, counted nowhere else
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


def _infer_reply(response: InferResponse, request: InferRequest, binary_default: bool, accept_encoding: str) -> Reply:
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
    return Reply(200, out, reply_headers)


def _finish(scope: Scope, status: int, error: BaseException) -> None:
    """End the scope's exchange, if it is an inference request's, that got no answer: its
    client went away (or cancelled it)."""
    exchange = scope.get(_EXCHANGE)
    if exchange is not None:
        exchange.finish(status, status, error, "cancelled")


def _unsupported(endpoint: Endpoint) -> Callable[[Params, Scope, Receive], Awaitable[Reply]]:
    async def handler(params: Params, scope: Scope, receive: Receive) -> Reply:
        raise Unsupported(f"{endpoint.summary} is not supported by onnxgate")

    return handler


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of header ``name`` (lowercase, as ASGI gives names), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _refusal(exc: GatewayError) -> str:
    """How the audit log records an error answer: ``403 PermissionDenied: <message>``."""
    return f"{http_status(exc)} {type(exc).__name__}: {exc}"


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


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


#: How long an answer may take before the client's connection is watched for a disconnect. Most
#: answers come sooner and then cost no watch at all (a task per request, the main cost of one
#: client's request in the ASGI layer); a client gone while its request waits longer is noticed
#: within this much time of the request's start.
DISCONNECT_WATCH_AFTER_S = 0.002


async def _unless_disconnected(work: Awaitable[T], receive: Receive) -> T:
    """Await ``work``, cancelling it (and so taking its request out of any queue) when the
    client disconnects first; the watch starts only once ``work`` has taken
    :data:`DISCONNECT_WATCH_AFTER_S`."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    gone = False
    watch: asyncio.Task | None = None

    def on_message(done: asyncio.Task) -> None:
        nonlocal gone
        if not done.cancelled() and done.exception() is None and done.result()["type"] == "http.disconnect":
            gone = True
            task.cancel()

    def start_watch() -> None:
        nonlocal watch
        watch = loop.create_task(receive())
        watch.add_done_callback(on_message)

    timer = loop.call_later(DISCONNECT_WATCH_AFTER_S, start_watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            raise ClientGone() from None
        raise
    finally:
        timer.cancel()
        if watch is not None:
            watch.remove_done_callback(on_message)
            watch.cancel()


def guarded_metrics(app: Callable[[Scope, Receive, Send], Awaitable[None]], access: AccessPolicy):
    """The metrics app behind ``security.metrics_token_sha256`` (itself when none is set)."""
    if not access.metrics_tokens:
        return app

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not access.metrics_allowed(_header(scope, b"authorization")):
            body = orjson.dumps({"error": METRICS_REFUSAL})
            headers = [*JSON, (b"content-length", str(len(body)).encode()), (b"www-authenticate", b"Bearer")]
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return guarded


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
