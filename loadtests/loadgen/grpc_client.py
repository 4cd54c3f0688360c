"""Load generator: gRPC clients (run inside the worker processes), unary ``ModelInfer`` and
``ModelStreamInfer`` streams; ``infer()`` returns None on success or an error kind.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from loadtests.loadgen.payload import Payload, Target

GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
GRPC_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_grpc_reply(reply: Any, outputs: tuple[str, ...]) -> str | None:
    if not reply.outputs or len(reply.raw_output_contents) != len(reply.outputs):
        return "invalid_response"
    if outputs and [o.name for o in reply.outputs] != list(outputs):
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
