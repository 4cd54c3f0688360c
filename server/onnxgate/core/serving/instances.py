"""One thread per model instance (ONNX Runtime session), and what outlives a closed version.

Each session always runs on its own thread, handed work through a queue: cheaper than an executor
hop (no concurrent.futures.Future, no chaining). A run inside ONNX Runtime cannot be interrupted:
closing a thread lets it end after its current run, and :func:`runs_in_progress` tells the
process, at exit, whether any is still inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref


def set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()


def runs_in_progress() -> int:
    """Instance threads still alive: each is inside an ONNX Runtime run that cannot be
    interrupted (or about to end). A process must not run its exit handlers under them:
    ONNX Runtime's static destructors abort a process whose session is still running."""
    return sum(t.is_alive() for t in list(_THREADS))


class InstanceThread:
    """One thread per instance, handed work through a queue: cheaper than an executor hop
    (no concurrent.futures.Future, no chaining), and each session always runs on its thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()
        _THREADS.add(self._thread)

    def run(self, loop: asyncio.AbstractEventLoop, fn, *args) -> asyncio.Future:
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the waiting coroutine
                _hand_back(loop, set_exception, future, exc)
            else:
                _hand_back(loop, set_result, future, result)

    def close(self) -> None:
        """End the thread once its current job (if any) is done; returns at once."""
        self._jobs.put(None)


def _hand_back(loop: asyncio.AbstractEventLoop, setter, future: asyncio.Future, value: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed while the run went on (the process is exiting)
        loop.call_soon_threadsafe(setter, future, value)
