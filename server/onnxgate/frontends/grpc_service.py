"""The gRPC front end: ``inference.GRPCInferenceService`` on grpc.aio, plus gRPC health.

Each method decodes with ``grpc_codec``, calls the :class:`InferenceService`, and encodes;
core errors become status codes through ``status``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from onnxgate.core.admission import INLINE_DECODE_BYTES
from onnxgate.core.inference import REQUEST_ID_HEADER, InferRequest, InferResponse
from onnxgate.core.service import UNKNOWN_MODEL_LABEL, Exchange, InferenceService
from onnxgate.errors import GatewayError, InvalidInput, Overloaded, PayloadTooLarge
from onnxgate.frontends import grpc_codec
from onnxgate.frontends.endpoints import grpc_endpoints
from onnxgate.frontends.grpc_access import GrpcAccess
from onnxgate.frontends.status import CUT_MESSAGE, grpc_code
from onnxgate_client.pb import grpc_service_pb2 as pb
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
_INFER_SPAN = "inference.GRPCInferenceService/ModelInfer"
_STREAM_SPAN = "inference.GRPCInferenceService/ModelStreamInfer"


def _mapped(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Turn core errors into gRPC statuses; anything unexpected into INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext) -> T:
        try:
            if isinstance(request, Malformed):
                raise InvalidInput(request.message)
            return await method(self, request, context)
        except GatewayError as exc:
            # A shed request says why (queue_full, deadline, ...) in the trailer onnxgate-reason.
            reason = (("onnxgate-reason", exc.reason),) if isinstance(exc, Overloaded) else ()
            await context.abort(grpc_code(exc), exc.message, (*(context.trailing_metadata() or ()), *reason))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the gateway log")
        raise AssertionError("unreachable")  # pragma: no cover

    return wrapper


#: Stream call metadata (Triton's): the first failed request ends the stream with its status.
GRPC_ERROR_HEADER = "triton_grpc_error"
#: Without it: the parameter of a failed request's reply naming its gRPC status code.
STREAM_STATUS_PARAMETER = "grpc_status_code"


class GrpcInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """V2 gRPC API over the inference service.

    Unary calls fail with the status ``status.grpc_code`` maps the core error to. A failed
    request of a ``ModelStreamInfer`` stream gets a reply with ``error_message`` and, in
    ``infer_response.parameters["grpc_status_code"]``, the name of that same status; the stream
    stays open. A stream opened with the metadata ``triton_grpc_error: true`` (Triton's
    convention) ends at its first failure, with that status and message instead."""

    def __init__(self, service: InferenceService, stream_window: int = 256) -> None:
        self.service = service
        self.stream_window = stream_window

    @_mapped
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.service.live)

    @_mapped
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready and not self.service.draining)

    @_mapped
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))

    @_mapped
    async def ServerMetadata(self, request, context):
        meta = self.service.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @_mapped
    async def ModelMetadata(self, request, context):
        return grpc_codec.metadata_message(self.service.model_metadata(request.name, request.version))

    @_mapped
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.service.model_config(request.name, request.version))

    @_mapped
    async def ModelStatistics(self, request, context):
        return grpc_codec.stats_message(self.service.statistics(request.name, request.version))

    @_mapped
    async def RepositoryIndex(self, request, context):
        _check_repository_name(request.repository_name)
        return grpc_codec.index_message(self.service.repository_index(request.ready))

    @_mapped
    async def RepositoryModelLoad(self, request, context):
        _check_repository_name(request.repository_name)
        await self.service.load_model(request.model_name, grpc_codec.repository_params(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_mapped
    async def RepositoryModelUnload(self, request, context):
        _check_repository_name(request.repository_name)
        await self.service.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @_mapped
    async def ModelInfer(self, request, context):
        """One unary inference; its request id goes back in the trailing metadata ``x-request-id``."""
        svc = self.service
        client_id, trace = _call_ids(context, svc.trace_headers)
        peer = context.peer() if svc.logs_access else None
        exchange = svc.begin("grpc", "", client_id, trace, peer, _INFER_SPAN)
        slack = _deadline_slack(context)
        try:
            deadline = _deadline_ns(context)
            decoded = await self._decode(request)
            exchange.target = decoded.model_name
            decoded.deadline_ns = deadline
            decoded.exchange = exchange
            if svc.wants_headers:
                decoded.headers = _metadata(context)
            reply = await self._encode(await svc.infer(decoded))
        except BaseException as exc:
            code, kind = _status_of(exc, context, slack)
            _identify_refused(exchange, request)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, exchange.identify("")),))
            exchange.finish(code.name, code.value[0], exc, kind)
            raise
        context.set_trailing_metadata(((REQUEST_ID_HEADER, exchange.identify("")),))
        exchange.finish("OK", 0)
        return reply

    async def _encode(self, response: InferResponse, stream: bool = False) -> bytes:
        """The serialized reply, written straight from the outputs (see ``serialize_infer``); a
        large one off the loop, like a large request is decoded."""
        if (size := response.nbytes()) < INLINE_DECODE_BYTES:
            return grpc_codec.serialize_infer(response, stream)
        return await self.service.decode_budget.offload(size, grpc_codec.serialize_infer, response, stream)

    async def _decode(self, raw: bytes) -> InferRequest:
        """An infer message arrives unparsed: its model is looked up from the leading fields,
        the message checked against what that model accepts, and only then parsed and decoded,
        under the gateway's decode budget (large messages off the loop)."""
        svc = self.service
        size = len(raw)
        target = grpc_codec.peek_target(raw)
        if target is None:  # not in canonical order: only a full parse can say (budgeted)
            with svc.decoding(UNKNOWN_MODEL_LABEL, size, "grpc"):
                request = await svc.decode_budget.offload(size, grpc_codec.parse_infer, raw)
            name, version = request.model_name, request.model_version
        else:
            request, (name, version, _) = None, target
        label, elements = svc.request_bound(name, version, "grpc")
        limit = grpc_codec.message_limit(elements)
        if limit is not None and size > limit:
            raise PayloadTooLarge(
                f"request of {size} bytes exceeds {limit} bytes, the most a valid request for '{name}' needs"
            )
        if request is not None:
            return request
        with svc.decoding(label, size, "grpc"):
            if size < INLINE_DECODE_BYTES:  # the common case, without a coroutine
                return grpc_codec.parse_infer(raw)
            return await svc.decode_budget.offload(size, grpc_codec.parse_infer, raw)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Requests run concurrently (up to ``stream_window``); replies come as they finish,
        matched to requests by ``id``.

        A failed request, by default, gets a reply of its own and the stream stays open: as in
        Triton, ``error_message`` holds the message and ``infer_response`` only the request's
        ``id`` (and name and version); onnxgate adds the status a unary call would have got, by
        name, in ``infer_response.parameters["grpc_status_code"]`` (a ``string_param`` such as
        ``"INVALID_ARGUMENT"``), so a client can tell a retryable failure from bad input.

        With the call metadata ``triton_grpc_error: true`` (Triton's opt-in), the first failure
        instead ends the stream with that status and message; requests still running are
        cancelled and replies not yet sent are dropped."""
        svc = self.service
        headers = _metadata(context) if svc.wants_headers else {}
        deadline = _deadline_ns(context)  # the stream's: every request's answer is due by it
        slack = _deadline_slack(context)
        trace = _call_ids(context, svc.trace_headers)[1]  # the stream's: every request continues it
        peer = context.peer() if svc.logs_access else None
        close_on_error = _grpc_error_mode(context)
        replies: asyncio.Queue[tuple[bytes, str, grpc.StatusCode | None, Exchange | None] | None] = asyncio.Queue()
        window = asyncio.Semaphore(self.stream_window)
        running: set[asyncio.Task] = set()

        async def run_one(req: bytes) -> None:
            replies.put_nowait(await self._stream_one(req, context, headers, deadline, trace, peer, slack))

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(run_one(req))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        ended: BaseException = asyncio.CancelledError()  # how replies not written end (see _unwritten)
        item = None
        try:
            while (item := await replies.get()) is not None:
                reply, error, code, exchange = item
                if code is not None and close_on_error:
                    await context.abort(code, error)
                try:
                    yield reply
                except BaseException as exc:  # the stream ended while this reply was being written
                    ended = exc
                    raise
                if exchange is not None:  # logged once written, not once computed
                    exchange.finish("OK", 0)
                window.release()
            await reader
        except asyncio.CancelledError as exc:  # the drain's cut (with its message) or the client
            ended = exc
            _cancel_all(running, exc.args[0] if exc.args else None)
            raise
        finally:
            reader.cancel()
            _cancel_all(running, None)
            _unwritten(item, replies, ended, context, slack)

    async def _stream_one(
        self, req: bytes, context: grpc.aio.ServicerContext, headers: dict[str, str], deadline_ns: int = 0,
        trace: dict[str, str] | None = None, peer: str | None = None, slack_s: float = 0.0,
    ) -> tuple[bytes, str, grpc.StatusCode | None, Exchange | None]:
        """The serialized reply to one streamed request, the error message and status it failed
        with (None: it did not), and its exchange when it is still to be finished (a success,
        logged once written; a failure is logged here). Each request of a stream is an exchange of its own: its
        request id is its V2 ``id``, else a new one (the stream's ``x-request-id`` would be the
        same for all of them)."""
        svc = self.service
        exchange = svc.begin("grpc", "", None, trace, peer, _STREAM_SPAN)
        try:
            decoded = await self._decode(req)
            exchange.target = decoded.model_name
            decoded.headers = headers
            decoded.deadline_ns = deadline_ns
            decoded.exchange = exchange
            response = await svc.infer(decoded)
            reply = await self._encode(response, stream=True)
            return reply, "", None, exchange  # finished once written (ModelStreamInfer)
        except GatewayError as exc:
            code, message = grpc_code(exc), exc.message
            reason = exc.reason if isinstance(exc, Overloaded) else ""
            _identify_refused(exchange, req)
            exchange.finish(code.name, code.value[0], exc)
        except asyncio.CancelledError as exc:  # logged with the status the stream ends with
            code, kind = _status_of(exc, context, slack_s)
            exchange.finish(code.name, code.value[0], exc, kind)
            raise
        except Exception as exc:
            log.exception("unhandled error in ModelStreamInfer")
            code, message, reason = grpc.StatusCode.INTERNAL, "internal error; see the gateway log", ""
            exchange.finish(code.name, code.value[0], exc)
        name, version, request_id = grpc_codec.peek_target(req) or ("", "", "")
        failed = pb.ModelInferResponse(model_name=name, model_version=version, id=request_id)
        failed.parameters[STREAM_STATUS_PARAMETER].string_param = code.name
        if reason:
            failed.parameters["reason"].string_param = reason
        reply = pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
        return reply.SerializeToString(), message, code, None



def _unwritten(current: object, replies: asyncio.Queue, ended: BaseException,
               context: grpc.aio.ServicerContext, slack_s: float) -> None:
    """The stream ended: the successful replies it did not write (``current`` being written,
    and those still queued) are logged with the status the stream ended with."""
    code, kind = _status_of(ended, context, slack_s) if isinstance(ended, asyncio.CancelledError) else (
        grpc.StatusCode.CANCELLED, "cancelled")
    items = [current]
    while not replies.empty():
        items.append(replies.get_nowait())
    for item in items:
        if isinstance(item, tuple) and item[3] is not None:
            item[3].finish(code.name, code.value[0], ended, kind)


def _cancel_all(tasks: set[asyncio.Task], message: str | None) -> None:
    """Cancels the stream's running requests, passing on the cut's message (see ``_status_of``)."""
    for task in list(tasks):
        task.cancel(message)


def _deadline_ns(context: grpc.aio.ServicerContext) -> int:
    """The call's deadline, as the client set it (perf_counter_ns; 0 = none)."""
    remaining = context.time_remaining()
    if remaining is None:
        return 0
    return time.perf_counter_ns() + max(1, int(remaining * 1e9))


def _call_ids(
    context: grpc.aio.ServicerContext, trace_headers: Collection[str] | None
) -> tuple[str | None, dict[str, str] | None]:
    """The call's ``x-request-id`` (None: none) and, when tracing is on, the metadata of its
    ``trace_headers`` (the keys the propagators read)."""
    client_id = None
    trace: dict[str, str] | None = {} if trace_headers is not None else None
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            client_id = value if isinstance(value, str) else ""
        elif trace is not None and key in trace_headers and isinstance(value, str):  # type: ignore[operator]
            trace[key] = value
    return client_id, trace


def _identify_refused(exchange: Exchange, raw: object) -> None:
    """A request refused before it was decoded: its model and V2 id from the message's leading
    fields, when they can be read."""
    if not exchange.target and isinstance(raw, bytes) and (target := grpc_codec.peek_target(raw)) is not None:
        exchange.target = target[0]
        exchange.identify(target[2])


# The client's deadline runs out before the call's deadline here: the server's is the timeout the
# client sent, counted from when its headers arrived. When the client's clock runs out first it
# cancels the call (an HTTP/2 RST_STREAM, which does not say why), so a cancellation that arrives
# with less than the slack left is taken for the client's deadline, not a cancel of its own: a
# guess, which the slack bounds to the headers' plausible delay (at most DEADLINE_SLACK_S) and to
# a tenth of the call's whole window (a short deadline's calls are not all deadlines).
DEADLINE_SLACK_S = 0.1
DEADLINE_SLACK_SHARE = 0.1


def _deadline_slack(context: grpc.aio.ServicerContext) -> float:
    """The slack (above) of the call, from the time it has left as it starts (0: no deadline)."""
    remaining = context.time_remaining()
    return 0.0 if remaining is None else min(DEADLINE_SLACK_S, DEADLINE_SLACK_SHARE * remaining)


def _status_of(exc: BaseException, context: grpc.aio.ServicerContext,
               slack_s: float = 0.0) -> tuple[grpc.StatusCode, str]:
    """The status a unary call that raised ``exc`` ends with, as the client sees it (``_mapped``
    answers core errors; the drain's cut, UNAVAILABLE; a deadline the client set, its own
    DEADLINE_EXCEEDED), and the outcome to log when the error's class does not say it."""
    if isinstance(exc, GatewayError):
        return grpc_code(exc), ""
    if isinstance(exc, asyncio.CancelledError):
        if exc.args and exc.args[0] == CUT_MESSAGE:  # RpcCutter.cut: answered UNAVAILABLE
            return grpc.StatusCode.UNAVAILABLE, "unavailable"
        remaining = context.time_remaining()
        if remaining is not None and remaining <= slack_s:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded"
        return grpc.StatusCode.CANCELLED, "cancelled"
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN, ""
    return grpc.StatusCode.INTERNAL, ""


def _grpc_error_mode(context: grpc.aio.ServicerContext) -> bool:
    """Whether the stream asked, with Triton's ``triton_grpc_error: true``, to end on an error."""
    return any(k == GRPC_ERROR_HEADER and str(v).lower() == "true" for k, v in context.invocation_metadata() or ())


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Call metadata as text headers (binary ``-bin`` values are left out)."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _check_repository_name(name: str) -> None:
    if name:
        raise InvalidInput(f"repository_name must be empty; onnxgate serves one repository, got '{name}'")


class HealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1: SERVING iff the gateway is ready, whatever ``service`` is asked."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def Check(self, request, context):
        ok = self.service.ready and not self.service.draining
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Watch is not supported; poll Check")


_STREAMING = {"ModelStreamInfer"}
_RAW = {"ModelInfer", "ModelStreamInfer"}


class Malformed:
    """What a request message that does not parse becomes: its handler answers INVALID_ARGUMENT
    (grpc would answer UNKNOWN and log a traceback per message)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _parser(cls: type) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return cls.FromString(data)
        except DecodeError:
            return Malformed(f"the request is not a valid {cls.DESCRIPTOR.full_name} message")

    return parse


def _unimplemented(what: str) -> Callable:
    async def unimplemented(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not supported by onnxgate")

    return unimplemented


def add_to_server(
    server: grpc.aio.Server,
    service: InferenceService,
    wrap: Callable[[Callable, bool], Callable] | None = None,
    access: GrpcAccess | None = None,
) -> None:
    """Register the inference and health services on ``server``.

    As one generic handler per service: grpc.aio waits on every registered method's future for
    each call, which the 20 methods of the generated ``add_*_to_server`` make measurably slower.
    Methods not implemented here answer UNIMPLEMENTED, as grpc does for unknown methods. Every
    method has its endpoint in ``endpoints.ENDPOINTS`` (else this raises): ``access`` checks its
    scope. ``wrap(behaviour, streaming)``, when given, wraps each method (the drain's call cutter)."""
    servicer = GrpcInferenceServicer(service)
    descriptor = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    endpoints = grpc_endpoints(m.name for m in descriptor.methods)
    handlers = {}
    for method in descriptor.methods:
        endpoint = endpoints[method.name]
        fn = getattr(servicer, method.name) if endpoint.implemented else _unimplemented(endpoint.summary)
        if access is not None:
            fn = access.wrap(fn, endpoint, method.name in _STREAMING)
        if wrap is not None:
            fn = wrap(fn, method.name in _STREAMING)
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        factory = (
            grpc.stream_stream_rpc_method_handler if method.name in _STREAMING else grpc.unary_unary_rpc_method_handler
        )
        # Infer messages reach the servicer as bytes, parsed only once their model is known; their
        # replies leave it serialized.
        raw = method.name in _RAW
        handlers[method.name] = factory(
            fn,
            request_deserializer=None if raw else _parser(request_cls),
            response_serializer=None if raw else response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))
    server.add_generic_rpc_handlers((_health_handler(HealthServicer(service)),))


def _health_handler(health: HealthServicer) -> grpc.GenericRpcHandler:
    """grpc.health.v1 as a generic handler too: the generated ``add_HealthServicer_to_server``
    also registers its two methods with the core, and grpc.aio then waits on one more future per
    registered method for every call the server takes."""
    req, resp = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            health.Check, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            health.Watch, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        ),
    }
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", handlers)
