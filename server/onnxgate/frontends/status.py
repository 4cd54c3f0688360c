"""The one table from core errors to HTTP statuses and gRPC codes."""

from __future__ import annotations

import grpc

from onnxgate.errors import (
    Conflict,
    Draining,
    GatewayError,
    InferenceFailed,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    Unsupported,
)

# What a request still running at the drain's deadline is answered (503 / UNAVAILABLE) with.
CUT_MESSAGE = "the gateway is shutting down and its drain timeout has passed; retry on another replica"

# Most specific first: the first matching class wins.
_TABLE: tuple[tuple[type[GatewayError], int, grpc.StatusCode], ...] = (
    (PayloadTooLarge, 413, grpc.StatusCode.INVALID_ARGUMENT),  # no valid request is this large: do not retry
    (InvalidInput, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFound, 404, grpc.StatusCode.NOT_FOUND),
    (Conflict, 409, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, 401, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, 403, grpc.StatusCode.PERMISSION_DENIED),
    (Draining, 503, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, 503, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unsupported, 501, grpc.StatusCode.UNIMPLEMENTED),
    (ModelLoadError, 400, grpc.StatusCode.INVALID_ARGUMENT),
    (InferenceFailed, 500, grpc.StatusCode.INTERNAL),
)


def http_status(exc: GatewayError) -> int:
    """HTTP status for a core error."""
    for cls, status, _ in _TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def grpc_code(exc: GatewayError) -> grpc.StatusCode:
    """gRPC status code for a core error."""
    for cls, _, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL
