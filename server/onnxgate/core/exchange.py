"""One inference exchange as the gateway sees it, from the front end's first byte to its answer:
its request id, its trace span, its access-log line and its place in the in-flight gauge.

A front end calls :meth:`Exchanges.begin` when an inference request arrives and
:meth:`Exchange.finish` with the status it answered; in between the service fills in what it
learned (the model and version that answered, rows, queue and compute time).

**The request id.** Every request has one: the client's ``X-Request-Id`` header (gRPC metadata
``x-request-id``), else the V2 request ``id``, else one made here (a per-process random prefix
and a counter: unique across workers and restarts, and costs no system call). A client's id must
be 1..128 visible ASCII characters (400 / INVALID_ARGUMENT otherwise: it is echoed in a header);
a V2 ``id`` that is not is not used as the request id, a new one is. The front ends echo it
(response header ``X-Request-Id``; gRPC trailing metadata ``x-request-id``), and it goes into
the access log, the span (``onnxgate.request_id``) and the sample-log record (``request_id``).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from typing import Any

from onnxgate.core.inference import REQUEST_ID_HEADER
from onnxgate.core.metrics import Metrics
from onnxgate.core.monitoring.access_log import AccessLogger
from onnxgate.core.tracing import Tracing
from onnxgate.errors import (
    Conflict,
    Draining,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
)

MAX_REQUEST_ID = 128
__all__ = ["REQUEST_ID_HEADER", "Exchange", "Exchanges", "new_request_id", "outcome", "usable_id"]

_prefix = ""
_counter = itertools.count(1)


def _new_prefix() -> None:
    global _prefix, _counter
    _prefix = os.urandom(6).hex() + "-"
    _counter = itertools.count(1)


_new_prefix()
os.register_at_fork(after_in_child=_new_prefix)  # each worker its own prefix


def new_request_id() -> str:
    """A request id unique to this process's lifetime (and, by its random prefix, beyond)."""
    return f"{_prefix}{next(_counter):x}"


def usable_id(text: str) -> bool:
    """Whether ``text`` can be a request id: 1..128 visible ASCII characters."""
    return 0 < len(text) <= MAX_REQUEST_ID and text.isascii() and text.isprintable() and " " not in text


class Exchange:
    """What is known of one inference request; :meth:`finish` ends it once."""

    __slots__ = (
        "_owner", "compute_ns", "peer", "protocol", "queue_ns", "received_ns", "request_id", "route", "rows",
        "span", "target", "version",
    )

    def __init__(self, owner: Exchanges, protocol: str, target: str, request_id: str, peer: Any,
                 received_ns: int, span: Any) -> None:
        self._owner: Exchanges | None = owner
        self.protocol = protocol
        self.target = target  # the model or route name asked for
        self.request_id = request_id  # "" until the V2 id is known (identify)
        self.peer = peer
        self.received_ns = received_ns
        self.span = span  # the sampled request's span, else None
        self.route = ""
        self.version = ""
        self.rows = 0
        self.queue_ns: int | None = None
        self.compute_ns: int | None = None

    def identify(self, v2_id: str) -> str:
        """The request id, once the request's V2 ``id`` is known: the client's header id, else
        that id (when usable), else a new one."""
        if not self.request_id:
            self.request_id = v2_id if v2_id and usable_id(v2_id) else new_request_id()
        return self.request_id

    def served(self, version: str, rows: int, queue_ns: int, compute_ns: int) -> None:
        """The service's part: which version answered, with how many rows, after what times."""
        self.version, self.rows, self.queue_ns, self.compute_ns = version, rows, queue_ns, compute_ns

    def finish(self, status: int | str, code: int, error: BaseException | None = None, kind: str = "") -> None:
        """The answer went out with ``status`` (HTTP status, or gRPC code name) and ``code`` (the
        number: HTTP status or gRPC code) after ``error`` (None: success); ``kind`` names the
        outcome when the error's class does not say it (a client gone: "cancelled"). Only the
        first call counts."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.finished(self, status, code, error, kind)


class Exchanges:
    """Begins and ends exchanges: the in-flight gauge, spans, the access log."""

    def __init__(
        self, metrics: Metrics, tracing: Tracing | None = None, access_log: AccessLogger | None = None
    ) -> None:
        self.tracing = tracing
        self.access_log = access_log
        self._in_flight = {p: metrics.in_flight.labels(p) for p in ("grpc", "http")}

    def begin(self, protocol: str, target: str, client_id: str | None, trace_headers: Mapping[str, str] | None,
              peer: Any = None, span_name: str = "") -> Exchange:
        """An inference request has arrived (``received`` now). ``client_id`` is its
        ``X-Request-Id`` (None: none; a bad one raises InvalidInput); ``trace_headers`` its
        ``traceparent``/``tracestate`` (only read when tracing is on)."""
        now = time.perf_counter_ns()
        if client_id is not None and not usable_id(client_id):
            raise InvalidInput(
                f"header X-Request-Id must be 1..{MAX_REQUEST_ID} visible ASCII characters, got {client_id!r:.60}"
            )
        span = None
        if self.tracing is not None:
            attributes = _FIRST_ATTRIBUTES.get((protocol, span_name)) or _attributes(protocol, span_name)
            span = self.tracing.request_span(span_name, trace_headers, now, attributes)
        ex = Exchange(self, protocol, target, client_id or "", peer, now, span)
        self._in_flight[protocol].inc()
        return ex

    def finished(self, ex: Exchange, status: int | str, code: int, error: BaseException | None, kind: str) -> None:
        now = time.perf_counter_ns()
        self._in_flight[ex.protocol].dec()
        request_id = ex.identify("")
        refused = code >= 400 if ex.protocol == "http" else code != 0
        outcome_ = kind or (outcome(error) if error is not None else f"status_{code}" if refused else "ok")
        reason = error.reason if isinstance(error, Overloaded) else ""
        message = error.message if isinstance(error, GatewayError) else (str(error) if error is not None else "")
        trace_id = ""
        if ex.span is not None:
            tracing = self.tracing
            assert tracing is not None
            trace_id = tracing.trace_id(ex.span)
            attributes: dict[str, Any] = {
                "onnxgate.model": ex.target,
                "onnxgate.request_id": request_id,
                "onnxgate.outcome": outcome_,
                "onnxgate.rows": ex.rows,
            }
            if ex.route:
                attributes["onnxgate.route"] = ex.route
            if ex.version:
                attributes["onnxgate.version"] = ex.version
            if ex.protocol == "http":
                attributes["http.response.status_code"] = code
                failed = code >= 500
            else:
                attributes["rpc.grpc.status_code"] = code
                failed = code not in _GRPC_CLIENT_FAULTS
            if reason:
                attributes["onnxgate.reason"] = reason
            tracing.end(ex.span, attributes, (message or outcome_) if failed else None, now)
        if self.access_log is not None:
            self.access_log.offer((
                time.time(), request_id, trace_id, ex.peer, ex.protocol, ex.target, ex.route, ex.version, status,
                outcome_, ex.rows, ex.queue_ns, ex.compute_ns, now - ex.received_ns, reason, message,
            ))


def _attributes(protocol: str, span_name: str) -> dict[str, Any]:
    """A request span's first attributes, from its name ("POST /v2/...", "package.Service/Method"),
    made once per name (the SDK copies them into each span)."""
    if protocol == "http":
        method, _, route = span_name.partition(" ")
        attributes = {"onnxgate.protocol": protocol, "http.request.method": method, "http.route": route}
    else:
        service, _, method = span_name.partition("/")
        attributes = {"onnxgate.protocol": protocol, "rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    if len(_FIRST_ATTRIBUTES) < 64:  # span names are the front ends' constants
        _FIRST_ATTRIBUTES[protocol, span_name] = attributes
    return attributes


_FIRST_ATTRIBUTES: dict[tuple[str, str], dict[str, Any]] = {}


# gRPC codes a server span does not count as its own error (OpenTelemetry's semantic conventions
# for RPC servers): OK and the caller's faults.
_GRPC_CLIENT_FAULTS = frozenset({0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 16})


def outcome(error: BaseException) -> str:
    """A failure's kind, as the metrics' ``outcome`` label has it: "invalid_input", "overloaded",
    ... ("cancelled" for a caller that went away, "error" for anything else)."""
    if type(error).__name__ == "CancelledError":
        return "cancelled"
    return _OUTCOMES.get(type(error), "error")


_OUTCOMES: dict[type, str] = {
    InvalidInput: "invalid_input",
    PayloadTooLarge: "too_large",
    ModelNotFound: "not_found",
    Conflict: "conflict",
    Overloaded: "overloaded",
    Draining: "draining",
    Unavailable: "unavailable",
}
