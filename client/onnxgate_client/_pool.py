"""Endpoints, deadlines, and the round-robin-with-failover loop both clients run.

Each call starts at the next endpoint in turn. Endpoints that failed recently (connection
failure, 503, 429) are moved to the back of the order for ``PENALTY_S`` seconds but are still
tried if everything else fails. A retriable failure (see ``OnnxgateError.retriable``) moves on
to the next endpoint while the caller's deadline lasts; every endpoint is tried at most once per
call, and each attempt gets whatever is left of the deadline. An endpoint that used up a
deadline (it accepted the request and never answered) is penalized too, so that the calls after
it start elsewhere, but the call that saw it raises :class:`DeadlineExceeded`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from onnxgate_client._errors import DeadlineExceeded, OnnxgateError, Unsupported
from onnxgate_client._ops import Op

T = TypeVar("T")
PENALTY_S = 2.0
SCHEMES = ("grpc", "grpcs", "http", "https")


def parse_url(url: str) -> tuple[str, str]:
    """``"grpc://host:8001"`` -> ``("grpc", "host:8001")``; ``"http://h:8000/"`` -> ``("http", "http://h:8000")``."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise ValueError(f"endpoint {url!r} must look like grpc://host:port, http://host:port or https://host:port")
    if parts.scheme.startswith("grpc"):
        if parts.path not in ("", "/"):
            raise ValueError(f"gRPC endpoint {url!r} cannot have a path")
        return parts.scheme, parts.netloc
    return parts.scheme, f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


class Deadline:
    """A total deadline across retries; ``None`` means none."""

    __slots__ = ("at", "timeout")

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


class SyncTransport(Protocol):
    url: str
    kind: str  # "grpc" or "http"

    def execute(self, op: Op[T], timeout: float | None) -> T: ...

    def close(self) -> None: ...


class AsyncTransport(Protocol):
    url: str
    kind: str

    def execute(self, op: Op[T], timeout: float | None) -> Awaitable[T]: ...

    async def close(self) -> None: ...


E = TypeVar("E", SyncTransport, AsyncTransport)


@dataclass(slots=True)
class Endpoint(Generic[E]):
    transport: E
    penalized_until: float = 0.0

    @property
    def url(self) -> str:
        return self.transport.url

    def can(self, op: Op) -> bool:
        return (op.make_grpc if self.transport.kind == "grpc" else op.make_http) is not None


class Balancer(Generic[E]):
    """Round robin over endpoints; recently failed ones go last."""

    def __init__(self, transports: Sequence[E]) -> None:
        if not transports:
            raise ValueError("a client needs at least one endpoint")
        self.endpoints: list[Endpoint[E]] = [Endpoint(t) for t in transports]
        self._turn = itertools.count()

    def order(self, usable: Callable[[Endpoint[E]], bool]) -> list[Endpoint[E]]:
        eps = [e for e in self.endpoints if usable(e)]
        if not eps:
            return eps
        start = next(self._turn) % len(eps)
        rotated = eps[start:] + eps[:start]
        now = time.monotonic()
        return sorted(rotated, key=lambda e: e.penalized_until > now)  # stable: keeps the rotation

    def for_op(self, op: Op) -> list[Endpoint[E]]:
        eps = self.order(lambda e: e.can(op))
        if not eps:
            raise Unsupported(f"{op.name} is not available over this client's transports; it needs http(s)://")
        return eps

    @staticmethod
    def failed(ep: Endpoint, exc: OnnxgateError) -> None:
        ep.penalized_until = time.monotonic() + PENALTY_S

    @staticmethod
    def succeeded(ep: Endpoint) -> None:
        ep.penalized_until = 0.0


def deadline_error(name: str, deadline: Deadline, last: OnnxgateError | None) -> DeadlineExceeded:
    detail = f"; last failure: {last}" if last else ""
    return DeadlineExceeded(f"{name}: the {deadline.timeout} s deadline passed{detail}")


def run_sync(balancer: Balancer[SyncTransport], op: Op[T], timeout: float | None) -> T:
    """Run ``op`` on the next endpoint, failing over on retriable errors within ``timeout``."""
    deadline = Deadline(timeout)
    last: OnnxgateError | None = None
    for ep in balancer.for_op(op):
        remaining = deadline.remaining()
        if remaining is not None and remaining <= 0:
            raise deadline_error(op.name, deadline, last) from last
        try:
            result = ep.transport.execute(op, remaining)
        except OnnxgateError as exc:
            if not exc.retriable:
                if isinstance(exc, DeadlineExceeded):
                    balancer.failed(ep, exc)
                raise
            balancer.failed(ep, exc)
            last = exc
            continue
        balancer.succeeded(ep)
        return result
    assert last is not None
    raise last


async def run_async(balancer: Balancer[AsyncTransport], op: Op[T], timeout: float | None) -> T:
    """The coroutine twin of :func:`run_sync`."""
    deadline = Deadline(timeout)
    last: OnnxgateError | None = None
    for ep in balancer.for_op(op):
        remaining = deadline.remaining()
        if remaining is not None and remaining <= 0:
            raise deadline_error(op.name, deadline, last) from last
        try:
            result = await ep.transport.execute(op, remaining)
        except OnnxgateError as exc:
            if not exc.retriable:
                if isinstance(exc, DeadlineExceeded):
                    balancer.failed(ep, exc)
                raise
            balancer.failed(ep, exc)
            last = exc
            continue
        balancer.succeeded(ep)
        return result
    assert last is not None
    raise last
