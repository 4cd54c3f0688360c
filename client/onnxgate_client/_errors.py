"""The client's exceptions: one tree, the same classes for gRPC and HTTP.

::

    OnnxgateError                  base; carries ``status``, ``code``, ``message``, ``endpoint``
    ├── InvalidInput               400 / INVALID_ARGUMENT: the request does not fit the model   never retried
    ├── NotFound                   404 / NOT_FOUND: unknown model, version or endpoint          never retried
    ├── Unauthenticated            401 / UNAUTHENTICATED: no token, or one the server rejects   never retried
    ├── PermissionDenied           403 / PERMISSION_DENIED: the token lacks the call's scope    never retried
    ├── Unavailable                503 / UNAVAILABLE: not ready, draining, unreachable         retried elsewhere
    │   └── ConnectionFailed       no answer: refused, reset, closed before replying           retried elsewhere
    ├── Overloaded                 429 / RESOURCE_EXHAUSTED: this replica's queue is full       retried elsewhere
    ├── DeadlineExceeded           the caller's total deadline passed (across every retry)     never retried
    ├── Unsupported                501 / UNIMPLEMENTED: a feature the server does not offer     never retried
    ├── ServerError                500 / INTERNAL and anything else the server reports         never retried
    └── RequestFailed              one request of a stream failed; the stream gives only a message

``status`` is the HTTP status (for gRPC, the HTTP status of the same condition) or ``None`` when
no server answered; ``code`` is the gRPC status code name (for HTTP, the equivalent name).

Retry policy, for clients given several endpoints: a request that failed with
:class:`Unavailable` (which includes :class:`ConnectionFailed`) or :class:`Overloaded` goes to
the next endpoint while the caller's deadline lasts. 429 / RESOURCE_EXHAUSTED means *this*
replica's queue is full; another replica may have room, and the request did not run, so moving
on is safe. Everything else is an answer about the request itself and is raised at once:
:class:`Unauthenticated` and :class:`PermissionDenied` in particular are about the caller's
token, which every replica judges alike, so they are never retried nor failed over.
"""

from __future__ import annotations

__all__ = [
    "ConnectionFailed",
    "DeadlineExceeded",
    "InvalidInput",
    "NotFound",
    "OnnxgateError",
    "Overloaded",
    "PermissionDenied",
    "RequestFailed",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
]


class OnnxgateError(Exception):
    """Base of every error the client raises for a failed call."""

    #: HTTP status for this kind of failure, used when the server gave none.
    default_status: int | None = 500
    #: gRPC status code name for this kind of failure.
    default_code: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status if status is not None else self.default_status
        self.code = code or self.default_code
        self.endpoint = endpoint

    def __str__(self) -> str:
        where = f" from {self.endpoint}" if self.endpoint else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"[{status}{self.code}]{where}: {self.message}"

    @property
    def retriable(self) -> bool:
        """Whether another endpoint may be asked: the request did not run on this one."""
        return False


class InvalidInput(OnnxgateError):
    """The request is malformed or does not match the model's inputs (400 / INVALID_ARGUMENT)."""

    default_status = 400
    default_code = "INVALID_ARGUMENT"


class NotFound(OnnxgateError):
    """Unknown model, version or endpoint (404 / NOT_FOUND)."""

    default_status = 404
    default_code = "NOT_FOUND"


class Unauthenticated(OnnxgateError):
    """The server wants a token and got none, or one it does not accept (401 / UNAUTHENTICATED).

    Give the client ``token=`` (or set ``ONNXGATE_TOKEN``); never retried.
    """

    default_status = 401
    default_code = "UNAUTHENTICATED"


class PermissionDenied(OnnxgateError):
    """The token is known but lacks the scope the call needs (403 / PERMISSION_DENIED); never retried."""

    default_status = 403
    default_code = "PERMISSION_DENIED"


class Unavailable(OnnxgateError):
    """The server, model or version cannot serve now (503 / UNAVAILABLE)."""

    default_status: int | None = 503
    default_code = "UNAVAILABLE"

    @property
    def retriable(self) -> bool:
        return True


class ConnectionFailed(Unavailable):
    """No answer from the endpoint: connection refused, reset, or closed before a reply."""

    default_status = None


class Overloaded(OnnxgateError):
    """The replica's queue is full or the request expired in it (429 / RESOURCE_EXHAUSTED).

    ``retry_after`` holds the server's ``Retry-After`` hint in seconds, when it sent one.
    """

    default_status = 429
    default_code = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        code: str | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code, endpoint=endpoint)
        self.retry_after = retry_after

    @property
    def retriable(self) -> bool:
        return True


class DeadlineExceeded(OnnxgateError):
    """The call's total deadline passed before an answer came (across every retry)."""

    default_status = None
    default_code = "DEADLINE_EXCEEDED"


class Unsupported(OnnxgateError):
    """The server does not implement what was asked (501 / UNIMPLEMENTED)."""

    default_status = 501
    default_code = "UNIMPLEMENTED"


class ServerError(OnnxgateError):
    """The server failed on a valid request (500 / INTERNAL), or answered something unexpected."""


class RequestFailed(OnnxgateError):
    """One request of a ``stream_infer`` stream failed.

    ``code`` is the gRPC status the request failed with when the server names it (onnxgate puts
    it in ``infer_response.parameters["grpc_status_code"]``); a server that sends only
    ``error_message`` (Triton) leaves it ``"UNKNOWN"``. ``status`` is ``None``.
    ``index`` is the position of the failed request in the caller's input sequence.
    """

    default_status = None
    default_code = "UNKNOWN"

    def __init__(self, message: str, *, index: int, endpoint: str | None = None) -> None:
        super().__init__(message, endpoint=endpoint)
        self.index = index


_BY_GRPC_CODE: dict[str, type[OnnxgateError]] = {
    "INVALID_ARGUMENT": InvalidInput,
    "NOT_FOUND": NotFound,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAVAILABLE": Unavailable,
    "RESOURCE_EXHAUSTED": Overloaded,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "UNIMPLEMENTED": Unsupported,
}

_BY_HTTP_STATUS: dict[int, type[OnnxgateError]] = {
    400: InvalidInput,
    401: Unauthenticated,
    403: PermissionDenied,
    404: NotFound,
    429: Overloaded,
    501: Unsupported,
    502: Unavailable,  # a proxy in front of a replica that is down
    503: Unavailable,
    504: DeadlineExceeded,
}

_HTTP_FOR_CODE = {cls.default_code: cls.default_status for cls in _BY_GRPC_CODE.values()}


def from_grpc(code: str, message: str, endpoint: str) -> OnnxgateError:
    """The exception for a gRPC status code name (e.g. ``"NOT_FOUND"``)."""
    cls = _BY_GRPC_CODE.get(code, ServerError)
    return cls(message, status=_HTTP_FOR_CODE.get(code, 500), code=code, endpoint=endpoint)


def from_http(status: int, message: str, endpoint: str, retry_after: float | None = None) -> OnnxgateError:
    """The exception for a non-200 HTTP status."""
    cls = _BY_HTTP_STATUS.get(status, ServerError)
    if cls is Overloaded:
        return Overloaded(message, retry_after=retry_after, status=status, endpoint=endpoint)
    return cls(message, status=status, endpoint=endpoint)


NO_TOKEN_HINT = "the client sent no token: pass token= or set ONNXGATE_TOKEN"


def with_token_hint(exc: OnnxgateError, has_token: bool) -> OnnxgateError:
    """``exc``, saying so when the server wanted a token and the client had none to send."""
    if isinstance(exc, Unauthenticated) and not has_token and NO_TOKEN_HINT not in exc.message:
        exc.message = f"{exc.message} ({NO_TOKEN_HINT})"
        exc.args = (exc.message,)
    return exc
