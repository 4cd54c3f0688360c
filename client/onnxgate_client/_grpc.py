"""gRPC transports: one channel per endpoint, sync (``grpc``) and async (``grpc.aio``)."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
import grpc.aio

from onnxgate_client._errors import ConnectionFailed, OnnxgateError, from_grpc
from onnxgate_client._ops import Op
from onnxgate_client.pb import grpc_service_pb2_grpc as pb_grpc

T = TypeVar("T")

# Unlimited messages like tritonclient; quick reconnects so a restarted replica is used again
# soon; round_robin so a name that resolves to several addresses (a headless Service) spreads.
# Not grpc.min_reconnect_backoff_ms: it is also the minimum connect (handshake) timeout, and a
# replica that accepts but never answers should use up the caller's deadline, not fail early.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.lb_policy_name", "round_robin"),
]

# UNAVAILABLE raised by the channel itself, not by a server: the connection failed.
_CONNECTION_HINTS = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "connections to all backends failing",
    "socket closed",
    "broken pipe",
    "connection attempt timed out",
    "dns resolution failed",
    "end of tcp stream",
)


def grpc_error(exc: grpc.RpcError, endpoint: str) -> OnnxgateError:
    """The client exception for a failed gRPC call (sync ``RpcError`` or ``AioRpcError``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    if name == "UNAVAILABLE" and any(h in details.lower() for h in _CONNECTION_HINTS):
        return ConnectionFailed(details, code=name, endpoint=endpoint)
    return from_grpc(name, details, endpoint)


def _credentials(scheme: str, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    return grpc.ssl_channel_credentials(root_certificates) if scheme == "grpcs" else None


class GrpcTransport:
    """A synchronous gRPC endpoint: one ``grpc.Channel``, thread-safe."""

    kind = "grpc"

    def __init__(self, scheme: str, target: str, root_certificates: bytes | None = None) -> None:
        self.url = f"{scheme}://{target}"
        creds = _credentials(scheme, root_certificates)
        if creds is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def execute(self, op: Op[T], timeout: float | None) -> T:
        call = op.grpc()
        try:
            reply = getattr(self.stub, call.rpc)(call.request, timeout=timeout)
        except grpc.RpcError as exc:
            raise grpc_error(exc, self.url) from None
        return call.parse(reply)

    def close(self) -> None:
        self.channel.close()


class AsyncGrpcTransport:
    """An asyncio gRPC endpoint: one ``grpc.aio.Channel``, created on first use in the running loop."""

    kind = "grpc"

    def __init__(self, scheme: str, target: str, root_certificates: bytes | None = None) -> None:
        self.url = f"{scheme}://{target}"
        self._scheme = scheme
        self._target = target
        self._root_certificates = root_certificates
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None

    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            creds = _credentials(self._scheme, self._root_certificates)
            if creds is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self._target, creds, options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def execute(self, op: Op[T], timeout: float | None) -> T:
        call = op.grpc()
        try:
            reply = await getattr(self.stub(), call.rpc)(call.request, timeout=timeout)
        except grpc.RpcError as exc:
            raise grpc_error(exc, self.url) from None
        return call.parse(reply)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
