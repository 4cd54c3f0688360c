"""gRPC transports: one channel per endpoint, sync (``grpc``) and async (``grpc.aio``)."""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
import grpc.aio

from onnxgate_client._auth import Credentials
from onnxgate_client._errors import ConnectionFailed, OnnxgateError, from_grpc, with_token_hint
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


def grpc_error(exc: grpc.RpcError, endpoint: str, has_token: bool = True) -> OnnxgateError:
    """The client exception for a failed gRPC call (sync ``RpcError`` or ``AioRpcError``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    if name == "UNAVAILABLE" and any(h in details.lower() for h in _CONNECTION_HINTS):
        return ConnectionFailed(details, code=name, endpoint=endpoint)
    return with_token_hint(from_grpc(name, details, endpoint), has_token)


def _check_scheme(scheme: str, credentials: Credentials) -> grpc.ChannelCredentials | None:
    if scheme == "grpcs" and credentials.grpc_credentials is None:
        raise ValueError("a grpcs:// endpoint needs Credentials made with its URL")
    return credentials.grpc_credentials if scheme == "grpcs" else None


class GrpcTransport:
    """A synchronous gRPC endpoint: one ``grpc.Channel``, thread-safe.

    ``metadata`` is what every call on it carries (the token), ``None`` when nothing.
    """

    kind = "grpc"

    def __init__(self, scheme: str, target: str, credentials: Credentials) -> None:
        self.url = f"{scheme}://{target}"
        creds = _check_scheme(scheme, credentials)
        self.metadata = credentials.grpc_metadata()
        self.has_token = credentials.has_token
        if creds is None:
            self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def __repr__(self) -> str:
        return f"GrpcTransport({self.url!r}, token={'<set>' if self.has_token else None})"

    def execute(self, op: Op[T], timeout: float | None) -> T:
        call = op.grpc()
        try:
            reply = getattr(self.stub, call.rpc)(call.request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, self.url, self.has_token) from None
        return call.parse(reply)

    def close(self) -> None:
        self.channel.close()


class AsyncGrpcTransport:
    """An asyncio gRPC endpoint: one ``grpc.aio.Channel``, created on first use in the running loop."""

    kind = "grpc"

    def __init__(self, scheme: str, target: str, credentials: Credentials) -> None:
        self.url = f"{scheme}://{target}"
        self._target = target
        self._creds = _check_scheme(scheme, credentials)
        self.metadata = credentials.grpc_metadata()
        self.has_token = credentials.has_token
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.GRPCInferenceServiceStub | None = None

    def __repr__(self) -> str:
        return f"AsyncGrpcTransport({self.url!r}, token={'<set>' if self.has_token else None})"

    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            creds = self._creds
            if creds is None:
                self._channel = grpc.aio.insecure_channel(self._target, options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(self._target, creds, options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def execute(self, op: Op[T], timeout: float | None) -> T:
        call = op.grpc()
        try:
            reply = await getattr(self.stub(), call.rpc)(call.request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise grpc_error(exc, self.url, self.has_token) from None
        return call.parse(reply)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
