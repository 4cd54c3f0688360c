"""The gRPC listener's options and drain: grpc.aio with the limits of the server config, drained
to one deadline.

The drain: :func:`drain_grpc` stops accepting at once, lets in-flight calls run until the
deadline, then cuts what is left: those calls answer UNAVAILABLE (through :class:`RpcCutter`
that wraps the method behaviours at registration), not dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from onnxgate.config import ServerConfig
from onnxgate.frontends.status import CUT_MESSAGE
from onnxgate.listeners.sockets import ANSWER_S

log = logging.getLogger("onnxgate")

_INT32_MAX = 2**31 - 1


def grpc_options(s: ServerConfig, reuse_port: bool) -> list[tuple[str, int]]:
    """grpc.aio server options for the limits of ``s``."""

    def ms(seconds: float) -> int:
        return min(_INT32_MAX, round(seconds * 1000))

    options = [
        ("grpc.max_receive_message_length", s.grpc_max_message_bytes),
        ("grpc.max_send_message_length", s.grpc_max_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # One hard limit, so that no request below it is refused at random (grpc's default soft
        # limit refuses a random share of those between it and the hard one).
        ("grpc.max_metadata_size", s.grpc_max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", s.grpc_max_metadata_bytes),
        # Pings clients may send: closer together than this without data is a strike.
        ("grpc.http2.min_ping_interval_without_data_ms", ms(s.grpc_min_client_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", s.grpc_max_ping_strikes),
        # The server's own keepalive pings go on while a call is open but quiet (a stream).
        ("grpc.http2.max_pings_without_data", 0),
    ]
    optional = [
        ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams, int),
        ("grpc.keepalive_time_ms", s.grpc_keepalive_time_s, ms),
        ("grpc.keepalive_timeout_ms", s.grpc_keepalive_timeout_s, ms),
        ("grpc.max_connection_idle_ms", s.grpc_max_connection_idle_s, ms),
        ("grpc.max_connection_age_ms", s.grpc_max_connection_age_s, ms),
    ]
    options += [(name, convert(value)) for name, value, convert in optional if value]
    if s.grpc_max_connection_age_s:  # 0 = calls open at the GOAWAY may run until they end
        options.append(("grpc.max_connection_age_grace_ms", ms(s.grpc_max_connection_age_grace_s) or _INT32_MAX))
    return options


class RpcCutter:
    """Knows the task of every running call, so that the drain can cut them at its deadline:
    each then answers UNAVAILABLE, where grpc's own grace timer would cancel it without a word
    (the client would see CANCELLED). It wraps the method behaviours when they are registered
    (:meth:`wrap`), not as a grpc.aio interceptor, which would add a coroutine to every call."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()
        self._cut = False

    def wrap(self, behaviour: Any, streaming: bool) -> Any:
        """A method behaviour (a coroutine function, or an async generator function when
        ``streaming``) that the drain can cut."""
        return self._stream(behaviour) if streaming else self._unary(behaviour)

    def cut(self) -> int:
        """Cancel every running call; returns how many."""
        self._cut = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel(CUT_MESSAGE)  # the call sees why (its access-log line says UNAVAILABLE)
        return len(tasks)

    async def _answer_cut(self, task: asyncio.Task, context: grpc.aio.ServicerContext) -> None:
        """In a call's ``except CancelledError``: the drain's cut is answered UNAVAILABLE; any
        other cancellation goes on."""
        if not self._cut:
            raise asyncio.CancelledError
        task.uncancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, CUT_MESSAGE)

    def _unary(self, behaviour: Any) -> Any:
        async def cuttable(request: Any, context: grpc.aio.ServicerContext) -> Any:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                return await behaviour(request, context)
            except asyncio.CancelledError:
                await self._answer_cut(task, context)
            finally:
                self._tasks.discard(task)

        return cuttable

    def _stream(self, behaviour: Any) -> Any:
        async def cuttable(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            replies = behaviour(requests, context)
            try:
                async for reply in replies:
                    yield reply
            except asyncio.CancelledError:
                await self._answer_cut(task, context)
            finally:
                self._tasks.discard(task)
                await replies.aclose()

        return cuttable


async def drain_grpc(server: grpc.aio.Server, cutter: RpcCutter, deadline: float) -> None:
    """Stop accepting calls; let running ones finish until ``deadline`` (loop time), then cut
    them (UNAVAILABLE). grpc's grace timer, just after, cancels any that did not answer."""
    remaining = max(0.0, deadline - asyncio.get_running_loop().time())
    stopping = asyncio.ensure_future(server.stop(remaining + ANSWER_S))
    done, _ = await asyncio.wait({stopping}, timeout=remaining)
    if not done and (cut := cutter.cut()):
        log.warning("drain timeout: answering %d unfinished gRPC call(s) UNAVAILABLE", cut)
    await stopping
