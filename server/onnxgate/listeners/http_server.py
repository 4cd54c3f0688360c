"""The HTTP listener: uvicorn (httptools) with connection limits, drained to one deadline.

HTTP limits uvicorn's httptools protocol does not have, added by :class:`LimitedHttpProtocol`:

- a request head (request line and headers) larger than ``max_header_bytes`` is answered 431,
  as soon as that many bytes have arrived, not once the head is complete;
- a head not complete within ``header_timeout_s`` of its first byte (or of the connection
  opening) is answered 408 (slowloris); a connection that sent nothing is just closed;
- a body that pauses for longer than ``body_timeout_s`` is answered 408 (time the gateway itself
  is behind, with reading paused, does not count);
- at most ``max_connections`` connections are served at once. A request on a connection past
  the cap first takes the place of the connection idle longest between requests (as nginx
  reuses keep-alive connections; that one is closed as the keep-alive timeout would close it),
  and is answered 503 with ``Retry-After`` only when every served connection is busy. A served
  connection is never refused for one that came later.

A refusal is written, then the write side is shut (FIN) and what the client still sends is read
and dropped for up to :data:`_LINGER_S` ("lingering close"), so that a client still sending reads
the answer instead of a connection reset.

The drain: :meth:`HttpServer.drain` stops accepting at once, lets in-flight requests run until
the deadline, then cuts what is left: those requests are answered 503, not dropped (the gRPC
listener's drain is :func:`onnxgate.listeners.grpc_server.drain_grpc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from onnxgate.config import ServerConfig
from onnxgate.frontends.status import CUT_MESSAGE
from onnxgate.listeners.sockets import ANSWER_S

log = logging.getLogger("onnxgate")

_LINGER_S = 2.0  # how long a refused connection's further input is read and dropped
_POLL_S = 0.05  # how often the HTTP drain looks whether the connections have gone
_FOREVER_S = 10.0**9  # a keep-alive timeout of 0 means none


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Per-connection limits of one HTTP listener (0 = off for the timeouts and the cap)."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, s: ServerConfig) -> HttpLimits:
        return cls(s.http_max_header_bytes, s.http_header_timeout_s, s.http_body_timeout_s, s.http_max_connections)


class _Slots:
    """The connections of one listener that are served, at most ``limit`` (0 = no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: set[LimitedHttpProtocol] = set()
        self._warned = -math.inf

    def take(self, conn: LimitedHttpProtocol, evict: bool = False) -> bool:
        """A place for ``conn``; when full and ``evict``, the one of the connection idle longest
        between requests (which is closed)."""
        if conn in self.held:
            return True
        if self.limit and len(self.held) >= self.limit:
            idle = [c for c in self.held if c.timeout_keep_alive_task is not None] if evict else []
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.timeout_keep_alive_task.when())  # type: ignore[union-attr]
            oldest._unset_keepalive_if_required()
            oldest.timeout_keep_alive_handler()  # closes it, as its keep-alive timeout would have
            self.held.discard(oldest)
        self.held.add(conn)
        return True

    def release(self, conn: LimitedHttpProtocol) -> None:
        self.held.discard(conn)

    def warn_full(self, logger: logging.Logger) -> None:
        """One warning a minute at most, however many connections are refused."""
        now = time.monotonic()
        if now - self._warned >= 60.0:
            self._warned = now
            logger.warning("HTTP connection limit (%d) reached: answering 503", self.limit)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that has been refused."""


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the limits in the module docstring."""

    def __init__(self, *args: Any, limits: HttpLimits, slots: _Slots, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._slots = slots
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0  # bytes of the current head, counted in whole reads
        self._read_len = 0  # bytes of the read being parsed
        self._heads = 0  # heads completed on this connection
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None  # the head or body timeout, or the linger
        self._refused = False
        self._draining = False

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Past the cap a new connection takes the place of the one idle longest, or is answered
        # 503 at once: sockets never pile up past the cap (the linger is bounded by _LINGER_S).
        if not self._slots.take(self, evict=True):
            self._slots.warn_full(self.logger)
            self._refuse(503, "too many connections; retry shortly", [(b"retry-after", b"1")])
            return
        self._arm(self._limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._slots.release(self)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: read and drop
        self._unset_keepalive_if_required()
        in_head, heads = self._in_head, self._heads
        self._read_len = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refused:  # a limit stopped the parser; the refusal is written
                return
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:  # websockets are off: keep uvicorn's warning
            self._unsupported_upgrade_warning()
        if self._refused or self.transport.is_closing():
            return
        # Timers only for what is left incomplete: a request that arrives whole in one read (the
        # usual case) arms none.
        if in_head and heads == self._heads:  # the whole read was head, and the head goes on
            self._head_bytes += len(data)
            if self._head_bytes > self._limits.max_header_bytes:
                self._refuse(431, f"request line and headers exceed {self._limits.max_header_bytes} bytes")
            elif self._timer is None:
                self._arm(self._limits.header_timeout_s)
        elif not self._in_head:  # a body goes on
            self._last_read = self.loop.time()
            if self._timer is None:
                self._arm(self._limits.body_timeout_s)

    def shutdown(self) -> None:
        """The drain began: close when idle, and serve no further request on this connection."""
        self._draining = True
        super().shutdown()

    # -- parser callbacks ---------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._disarm()
        self._heads += 1
        self._in_head = False
        # A head that completed within reads of at most the limit together is within it; only
        # otherwise are its bytes counted (the last read may hold a body and the next request).
        limit = self._limits.max_header_bytes
        size = self._head_bytes + self._read_len
        if size > limit:
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        self._head_bytes = 0
        if size > limit:
            self._refuse(431, f"request line and headers exceed {self._limits.max_header_bytes} bytes")
            raise _Refused()
        if not self._slots.take(self, evict=True):
            self._slots.warn_full(self.logger)
            self._refuse(503, "too many connections; retry shortly", [(b"retry-after", b"1")])
            raise _Refused()
        super().on_headers_complete()
        if self._draining:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._disarm()
        self._in_head = True
        super().on_message_complete()

    # -- limits -------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any = None) -> None:
        self._disarm()
        if delay > 0:
            self._timer = self.loop.call_later(delay, callback or self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        cycle = self.cycle
        if self._in_head:
            if cycle is not None and not cycle.response_complete:  # still answering the last request
                self._arm(self._limits.header_timeout_s)
            elif self._head_bytes:
                self._refuse(408, f"request head not received within {self._limits.header_timeout_s:g}s")
            else:  # nothing sent: no request to answer
                self.transport.close()
            return
        timeout = self._limits.body_timeout_s
        quiet = self.loop.time() - self._last_read
        if cycle is not None and cycle.response_complete:  # answered early; the rest of the body stalls
            self.transport.close()
        elif self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            self._arm(timeout)  # the gateway, not the client, is behind
        elif quiet < timeout:
            self._arm(timeout - quiet)
        else:
            self._refuse(408, f"request body stalled for {timeout:g}s")

    def _refuse(self, status: int, reason: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer ``status`` and close: the write side now, the read side when the client stops
        sending or after :data:`_LINGER_S`."""
        self._refused = True
        self._disarm()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() sees http.disconnect; its send() is dropped
            cycle.message_event.set()
            if cycle.response_started:  # half an answer is out: nothing else can be said
                self.transport.close()
                return
        body = reason.encode()
        head = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: text/plain; charset=utf-8\r\ncontent-length: ", str(len(body)).encode()]
        head += [b"\r\nconnection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self._arm(_LINGER_S, self.transport.close)


class _AnswerWhenCut:
    """The ASGI app, answering 503 for a request that the drain cancels before its answer began.
    An app with a ``cut`` attribute of its own (the gateway's HttpApp) does this itself, without
    a wrapper around every request's ``send``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.cut = False  # set by the drain at its deadline, before it cancels

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.cut or scope["type"] != "http":
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if not started:
                body = CUT_MESSAGE.encode()
                headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})


class HttpServer(uvicorn.Server):
    """uvicorn on a loop and signals that the gateway owns, with the limits of
    :class:`LimitedHttpProtocol`, drained to the gateway's deadline."""

    def __init__(
        self, app: Any, s: ServerConfig, protocol: type[LimitedHttpProtocol] = LimitedHttpProtocol, **extra: Any
    ) -> None:
        """``protocol`` (with the keyword arguments ``extra``): a subclass of :class:`LimitedHttpProtocol`."""
        self._app = app if hasattr(app, "cut") else _AnswerWhenCut(app)
        factory = functools.partial(
            protocol, limits=HttpLimits.from_config(s), slots=_Slots(s.http_max_connections), **extra
        )
        config = uvicorn.Config(
            self._app,
            http=factory,  # type: ignore[arg-type]
            ws="none",
            lifespan="off",
            access_log=False,
            proxy_headers=False,  # no proxy-header middleware around every request
            log_level="warning",
            timeout_keep_alive=s.http_keep_alive_timeout_s or _FOREVER_S,  # type: ignore[arg-type]  # for call_later
            backlog=s.http_backlog,
        )
        super().__init__(config)
        self._deadline: float | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def drain(self, deadline: float) -> None:
        """Begin the drain (``deadline`` in loop time); :meth:`serve` returns once it is over."""
        self._deadline = deadline
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, to the deadline: stop accepting, close idle connections, let the
        busy ones finish; at the deadline cancel what is left (each answers 503) and close."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        state = self.server_state
        for connection in list(state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout_at(self._deadline):
                while state.connections or state.tasks:
                    await asyncio.sleep(_POLL_S)
        except TimeoutError:
            self._app.cut = True
            tasks = list(state.tasks)
            if tasks:
                log.warning("drain timeout: answering %d unfinished HTTP request(s) 503", len(tasks))
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks, timeout=ANSWER_S)
            for connection in list(state.connections):
                connection.transport.close()
        if not self.force_exit:
            await self.lifespan.shutdown()
