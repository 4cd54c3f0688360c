"""The scope check on gRPC: each method of the endpoint table that can be refused is wrapped,
when it is registered, in a check of the call's ``authorization`` metadata (and, for admin
methods, a record in the audit log). Methods that can never be refused are not wrapped at all,
so without tokens on a loopback bind a call pays nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from onnxgate.core.security.access import AccessPolicy, Principal
from onnxgate.core.security.audit import AuditLog
from onnxgate.core.security.ratelimit import peer_address
from onnxgate.errors import GatewayError, Overloaded
from onnxgate.frontends.endpoints import Endpoint
from onnxgate.frontends.status import grpc_code

Behaviour = Callable[..., Any]


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return None


class GrpcAccess:
    """Wraps method behaviours in the access policy's check."""

    def __init__(self, access: AccessPolicy, audit: AuditLog | None = None) -> None:
        self.access = access
        self.audit = audit

    def wrap(self, behaviour: Behaviour, endpoint: Endpoint, streaming: bool) -> Behaviour:
        """``behaviour`` guarded by ``endpoint``'s scope (itself when nothing can be refused)."""
        if endpoint.scope != "admin" and not self.access.guards(endpoint.scope):
            return behaviour  # admin methods are always wrapped: they are audited
        if streaming:
            return self._stream(behaviour, endpoint)
        return self._unary(behaviour, endpoint)

    async def _check(self, endpoint: Endpoint, request: Any, context: grpc.aio.ServicerContext) -> Principal:
        try:
            # gRPC verifies client certificates at the TLS layer: a call that got here has one
            return self.access.check(endpoint.scope, endpoint.read_only, _authorization(context), context.peer())
        except GatewayError as exc:
            if not isinstance(exc, Overloaded):  # the failure limit's refusals are not recorded one by one
                token = getattr(exc, "token_name", "")
                self._audit(token, endpoint, request, context, f"{grpc_code(exc).name}: {exc.message}")
            await context.abort(grpc_code(exc), exc.message)
            raise AssertionError("unreachable") from None  # pragma: no cover

    def _audit(self, token: str, endpoint: Endpoint, request: Any, context: Any, result: str) -> None:
        if self.audit is not None and endpoint.scope == "admin":
            target = getattr(request, endpoint.grpc_target, "") if endpoint.grpc_target else ""
            self.audit.record(token, peer_address(context.peer()), endpoint.name, str(target), result)

    def _unary(self, behaviour: Behaviour, endpoint: Endpoint) -> Behaviour:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = await self._check(endpoint, request, context)
            if endpoint.scope != "admin":
                return await behaviour(request, context)
            try:
                reply = await behaviour(request, context)
            except BaseException:
                code = context.code() if hasattr(context, "code") else None
                name = code.name if isinstance(code, grpc.StatusCode) else "CANCELLED"
                details = context.details() if hasattr(context, "details") else ""
                self._audit(principal.name, endpoint, request, context, f"{name}: {details or ''}".rstrip(": "))
                raise
            self._audit(principal.name, endpoint, request, context, "ok")
            return reply

        return guarded

    def _stream(self, behaviour: Behaviour, endpoint: Endpoint) -> Behaviour:
        async def guarded(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await self._check(endpoint, None, context)
            async for reply in behaviour(requests, context):
                yield reply

        return guarded
