"""The threads that run model instances (ONNX Runtime sessions), and what outlives a closed version.

Each session runs on a thread of its own that takes its next batch from the version's queue by
itself (see ``batcher``) and hands results back to the event loop with one callback per batch.
A run inside ONNX Runtime cannot be interrupted: a closed version's threads end after their
current run, and :func:`runs_in_progress` tells the process, at exit, whether any is still
inside one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator


def set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


_RUNS = [0]  # instance threads inside an ONNX Runtime run now
_RUNS_LOCK = threading.Lock()


def runs_in_progress() -> int:
    """Instance threads inside an ONNX Runtime run, which cannot be interrupted. A process must
    not run its exit handlers under them: ONNX Runtime's static destructors abort a process
    whose session is still running. (A thread waiting for work does not count.)"""
    return _RUNS[0]


@contextlib.contextmanager
def one_run() -> Iterator[None]:
    """Around each ONNX Runtime run of an instance thread: counted by :func:`runs_in_progress`."""
    with _RUNS_LOCK:
        _RUNS[0] += 1
    try:
        yield
    finally:
        with _RUNS_LOCK:
            _RUNS[0] -= 1


def start_instance_thread(name: str, target: Callable[..., None], *args: object) -> threading.Thread:
    """Start a daemon thread for one instance."""
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


class ParkedThreads:
    """Instance threads waiting for work, each parked on a lock of its own that a waker
    releases: cheaper than a Condition's bookkeeping. Every method runs under ``lock`` (the
    queue's), which :meth:`wait` releases while parked. Threads filling a batch are woken before
    idle ones."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._parked: list[threading.Lock] = []  # fillers last: woken first
        self.filling = 0  # parked threads filling a batch

    def __bool__(self) -> bool:
        return bool(self._parked)

    @property
    def idle(self) -> int:
        """Parked threads waiting for work (not filling a batch)."""
        return len(self._parked) - self.filling

    def wake_one(self) -> None:
        """Wake one parked thread, if any: one filling a batch first."""
        if self._parked:
            self._parked.pop().release()

    def wake_all(self) -> None:
        while self._parked:
            self._parked.pop().release()

    def wait(self, wake: threading.Lock, timeout: float = -1, filling: bool = False) -> None:
        """In an instance thread: park on ``wake`` until woken (or the timeout). Wake-ups may be
        spurious: callers look at the queue again."""
        wake.acquire(blocking=False)  # a stale release (woken just as a timeout ended) is spent
        if filling:
            self._parked.append(wake)
            self.filling += 1
        else:
            self._parked.insert(0, wake)
        self._lock.release()
        try:
            wake.acquire(timeout=timeout)
        finally:
            self._lock.acquire()
            if wake in self._parked:
                self._parked.remove(wake)
            if filling:
                self.filling -= 1


def hand_back(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> None:
    """Run ``callback(*args)`` on ``loop`` (from an instance thread); nothing when the loop has
    closed meanwhile (the process is exiting)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
