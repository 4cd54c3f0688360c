"""The high-rate path: many requests over one ``ModelStreamInfer`` stream.

Up to ``window`` requests are outstanding (sent and not yet handed to the caller). Request ``i``
of the caller's sequence carries ``id = str(i)``; the server answers out of order and echoes the
id, and results are handed back in input order. A request that fails on the server comes back
as ``error_message`` and becomes a :class:`RequestFailed` in its place (raised, or yielded when
``return_exceptions`` is true); the stream carries on. Its ``code`` is the gRPC status the
server names in the reply's ``grpc_status_code`` parameter (``UNKNOWN`` from a server that
names none, such as Triton).

When the stream itself fails with a retriable error (the replica went away, is draining, or is
overloaded), a new stream is opened on the next gRPC endpoint and every unanswered request is
sent again; the caller sees nothing but the results. The stream gives up once every endpoint has
failed in a row with no answer in between. ``timeout`` bounds the whole stream.
"""

from __future__ import annotations

import asyncio
import queue
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio
import numpy as np

from onnxgate_client import _codec
from onnxgate_client._errors import ConnectionFailed, OnnxgateError, RequestFailed, ServerError
from onnxgate_client._grpc import AsyncGrpcTransport, GrpcTransport, grpc_error
from onnxgate_client._pool import Deadline, deadline_error
from onnxgate_client.pb import grpc_service_pb2 as pb

Result = dict[str, np.ndarray] | OnnxgateError
Inputs = Mapping[str, Any]
_END = object()
_STATUS_PARAMETER = "grpc_status_code"  # in a failed request's reply: the status, by name
# What grpc.aio reports for a call whose request could not be sent because the server had just
# ended it (refused the stream for its token, or while draining, say): the server's own status
# is then lost (grpc.aio overwrites it). An empty stream asks again: with nothing to send, nothing
# can fail to be sent, and a server that accepts waits for requests until _PROBE_S passes.
_SEND_FAILED = "Internal error from Core"
_PROBE_S = 2.0


class StreamBook:
    """What was sent, what came back, and what the caller gets next. Transport-free."""

    def __init__(
        self,
        model: str,
        version: str | int | None,
        outputs: Sequence[str] | None,
        parameters: Mapping[str, _codec.Scalar] | None,
        window: int,
        return_exceptions: bool,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.model, self.version, self.outputs, self.parameters = model, version, outputs, parameters
        self.window = window
        self.return_exceptions = return_exceptions
        self.pending: dict[int, pb.ModelInferRequest] = {}
        self.done: dict[int, Result] = {}
        self.next_in = 0
        self.next_out = 0
        self.exhausted = False
        self.failures = 0  # stream failures in a row, with no answer in between

    def has_room(self) -> bool:
        return not self.exhausted and self.next_in - self.next_out < self.window

    def add(self, feeds: Inputs) -> pb.ModelInferRequest | None:
        """Encode the next request; ``None`` when it failed locally (its error waits in ``done``)."""
        i = self.next_in
        self.next_in += 1
        try:
            request = _codec.make_request(self.model, feeds, self.outputs, self.version, self.parameters)
        except OnnxgateError as exc:
            self.done[i] = exc
            return None
        message = _codec.grpc_request(request, request_id=str(i))
        self.pending[i] = message
        return message

    def receive(self, reply: pb.ModelStreamInferResponse, endpoint: str) -> None:
        rid = reply.infer_response.id
        try:
            i = int(rid)
            self.pending.pop(i)
        except (ValueError, KeyError):
            raise ServerError(f"stream reply with unknown id {rid!r}", endpoint=endpoint) from None
        if reply.error_message:
            failed = RequestFailed(reply.error_message, index=i, endpoint=endpoint)
            params = reply.infer_response.parameters
            if _STATUS_PARAMETER in params and params[_STATUS_PARAMETER].string_param:
                failed.code = params[_STATUS_PARAMETER].string_param
            self.done[i] = failed
            return
        try:
            self.done[i] = _codec.grpc_outputs(reply.infer_response)
        except OnnxgateError as exc:
            self.done[i] = exc

    def ready(self) -> bool:
        return self.next_out in self.done

    def pop(self) -> Result:
        result = self.done.pop(self.next_out)
        self.next_out += 1
        if isinstance(result, OnnxgateError) and not self.return_exceptions:
            raise result
        return result

    def finished(self) -> bool:
        return self.exhausted and not self.pending and not self.done

    def unanswered(self) -> list[pb.ModelInferRequest]:
        return [self.pending[i] for i in sorted(self.pending)]

    def stream_failed(self, exc: OnnxgateError, endpoints: int, deadline: Deadline) -> None:
        """Raise unless another endpoint should take over the unanswered requests."""
        self.failures += 1
        if not exc.retriable or self.failures >= endpoints:
            raise exc
        if deadline.expired():
            raise deadline_error("stream_infer", deadline, exc) from exc


class _SyncStream:
    """One sync ModelStreamInfer call; requests go through a queue its sender thread drains."""

    def __init__(self, transport: GrpcTransport, timeout: float | None) -> None:
        self.url = transport.url
        self._has_token = transport.has_token
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call = transport.stub.ModelStreamInfer(
            iter(self._queue.get, _END), timeout=timeout, metadata=transport.metadata
        )

    def send(self, message: pb.ModelInferRequest) -> None:
        self._queue.put(message)

    def finish(self) -> None:
        self._queue.put(_END)

    def receive(self) -> pb.ModelStreamInferResponse:
        try:
            return next(self._call)
        except StopIteration:
            raise ConnectionFailed("the stream ended with requests unanswered", endpoint=self.url) from None
        except grpc.RpcError as exc:
            raise grpc_error(exc, self.url, self._has_token) from None

    def cancel(self) -> None:
        self._queue.put(_END)
        self._call.cancel()


def stream_sync(
    transports: Sequence[GrpcTransport], inputs: Iterable[Inputs], book: StreamBook, timeout: float | None
) -> Iterator[Result]:
    deadline = Deadline(timeout)
    source = iter(inputs)
    turn = 0
    stream = _SyncStream(transports[0], deadline.remaining())
    try:
        while True:
            while book.has_room():
                try:
                    feeds = next(source)
                except StopIteration:
                    book.exhausted = True
                    stream.finish()
                    break
                if (message := book.add(feeds)) is not None:
                    stream.send(message)
            if book.ready():
                yield book.pop()
                continue
            if book.finished():
                return
            try:
                reply = stream.receive()
            except OnnxgateError as exc:
                book.stream_failed(exc, len(transports), deadline)
                stream.cancel()
                turn += 1
                stream = _SyncStream(transports[turn % len(transports)], deadline.remaining())
                for message in book.unanswered():
                    stream.send(message)
                if book.exhausted:
                    stream.finish()
                continue
            book.failures = 0
            book.receive(reply, stream.url)
    finally:
        stream.cancel()


class _AsyncStream:
    """One grpc.aio ModelStreamInfer call fed from an asyncio queue."""

    def __init__(self, transport: AsyncGrpcTransport, timeout: float | None) -> None:
        self.url = transport.url
        self._transport = transport
        self._has_token = transport.has_token
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._call = transport.stub().ModelStreamInfer(self._requests(), timeout=timeout, metadata=transport.metadata)

    async def _requests(self) -> AsyncIterator[pb.ModelInferRequest]:
        while (item := await self._queue.get()) is not _END:
            yield item

    def send(self, message: pb.ModelInferRequest) -> None:
        self._queue.put_nowait(message)

    def finish(self) -> None:
        self._queue.put_nowait(_END)

    async def receive(self) -> pb.ModelStreamInferResponse:
        try:
            reply = await self._call.read()
        except grpc.RpcError as exc:
            raise grpc_error(await self._server_status(exc), self.url, self._has_token) from None
        if reply is grpc.aio.EOF:
            raise ConnectionFailed("the stream ended with requests unanswered", endpoint=self.url)
        return reply

    def cancel(self) -> None:
        self._queue.put_nowait(_END)
        self._call.cancel()

    async def _server_status(self, exc: grpc.RpcError) -> grpc.RpcError:
        """``exc``, or what the server answers an empty stream when grpc.aio lost its status."""
        if exc.code() != grpc.StatusCode.INTERNAL or exc.details() != _SEND_FAILED:  # type: ignore[attr-defined]
            return exc
        probe = self._transport.stub().ModelStreamInfer(timeout=_PROBE_S, metadata=self._transport.metadata)
        try:
            code, details = await probe.code(), await probe.details()
        finally:
            probe.cancel()
        if code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return exc  # the server takes streams: the failure was something else
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def _next_input(source: Iterator[Inputs] | AsyncIterator[Inputs]) -> Inputs:
    if isinstance(source, AsyncIterator):
        return await anext(source)
    try:
        return next(source)
    except StopIteration:
        raise StopAsyncIteration from None


async def stream_async(
    transports: Sequence[AsyncGrpcTransport],
    inputs: Iterable[Inputs] | AsyncIterable[Inputs],
    book: StreamBook,
    timeout: float | None,
) -> AsyncIterator[Result]:
    deadline = Deadline(timeout)
    source = aiter(inputs) if isinstance(inputs, AsyncIterable) else iter(inputs)
    turn = 0
    stream = _AsyncStream(transports[0], deadline.remaining())
    try:
        while True:
            while book.has_room():
                try:
                    feeds = await _next_input(source)
                except StopAsyncIteration:
                    book.exhausted = True
                    stream.finish()
                    break
                if (message := book.add(feeds)) is not None:
                    stream.send(message)
            if book.ready():
                yield book.pop()
                continue
            if book.finished():
                return
            try:
                reply = await stream.receive()
            except OnnxgateError as exc:
                book.stream_failed(exc, len(transports), deadline)
                stream.cancel()
                turn += 1
                stream = _AsyncStream(transports[turn % len(transports)], deadline.remaining())
                for message in book.unanswered():
                    stream.send(message)
                if book.exhausted:
                    stream.finish()
                continue
            book.failures = 0
            book.receive(reply, stream.url)
    finally:
        stream.cancel()


# -- without a gRPC endpoint: concurrent unary calls, same contract ---------------------------


def ordered_map_sync(
    call: Callable[[Inputs], dict[str, np.ndarray]],
    inputs: Iterable[Inputs],
    window: int,
    return_exceptions: bool,
) -> Iterator[Result]:
    """``call`` on each input with up to ``window`` in flight on threads; results in input order."""
    with ThreadPoolExecutor(max_workers=min(window, 32), thread_name_prefix="onnxgate-stream") as pool:
        running: deque[Future[dict[str, np.ndarray]]] = deque()
        try:
            for feeds in inputs:
                running.append(pool.submit(call, feeds))
                if len(running) >= window:
                    yield _result(running.popleft(), return_exceptions)
            while running:
                yield _result(running.popleft(), return_exceptions)
        finally:
            for future in running:
                future.cancel()


def _result(future: Future[dict[str, np.ndarray]], return_exceptions: bool) -> Result:
    try:
        return future.result()
    except OnnxgateError as exc:
        if return_exceptions:
            return exc
        raise


async def ordered_map_async(
    call: Callable[[Inputs], Awaitable[dict[str, np.ndarray]]],
    inputs: Iterable[Inputs] | AsyncIterable[Inputs],
    window: int,
    return_exceptions: bool,
) -> AsyncIterator[Result]:
    """The asyncio twin of :func:`ordered_map_sync`, on tasks."""
    source = aiter(inputs) if isinstance(inputs, AsyncIterable) else iter(inputs)
    running: deque[asyncio.Task[dict[str, np.ndarray]]] = deque()
    try:
        while True:
            try:
                feeds = await _next_input(source)
            except StopAsyncIteration:
                break
            running.append(asyncio.ensure_future(call(feeds)))
            if len(running) >= window:
                yield await _result_async(running.popleft(), return_exceptions)
        while running:
            yield await _result_async(running.popleft(), return_exceptions)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _result_async(task: asyncio.Task[dict[str, np.ndarray]], return_exceptions: bool) -> Result:
    try:
        return await task
    except OnnxgateError as exc:
        if return_exceptions:
            return exc
        raise
