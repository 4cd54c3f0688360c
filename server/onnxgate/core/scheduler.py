"""Runs requests on a model version's sessions, off the event loop, with a bounded queue.

A scheduler is the one seam between the service and ONNX Runtime: ``submit`` takes validated
feeds and returns the outputs of one request. :class:`DirectScheduler` runs each request as
its own execution; a dynamic batcher offers the same ``submit``/``drain``/``close``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from onnxgate.core.model import ModelVersion
from onnxgate.core.stats import ExecutionTiming, VersionStats
from onnxgate.errors import Overloaded


class DirectScheduler:
    """One execution per request; one worker thread per instance; bounded waiting."""

    def __init__(self, model: ModelVersion, stats: VersionStats, max_queue_size: int = 1024) -> None:
        self.model = model
        self.stats = stats
        self.max_queue_size = max_queue_size
        self._instances = max(1, len(model.sessions))
        self._executor = ThreadPoolExecutor(
            max_workers=self._instances, thread_name_prefix=f"ort-{model.name}-{model.version}"
        )
        self._slot = threading.local()
        self._next_slot = itertools.count()
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        """Requests accepted and not yet answered."""
        return self._pending

    async def submit(
        self, feeds: Mapping[str, np.ndarray], rows: int, outputs: Sequence[str]
    ) -> tuple[list[np.ndarray], ExecutionTiming]:
        """Run one request; raises :class:`Overloaded` at once when the queue is full."""
        if self._pending >= self.max_queue_size + self._instances:
            raise Overloaded(
                f"model '{self.model.name}' version {self.model.version} has {self._pending} "
                f"requests pending (queue limit {self.max_queue_size})"
            )
        self._pending += 1
        self._idle.clear()
        try:
            loop = asyncio.get_running_loop()
            queued_at = time.perf_counter_ns()
            result, timing = await loop.run_in_executor(self._executor, self._run, feeds, outputs, queued_at)
            self.stats.record_execution(rows, timing)
            return result, timing
        finally:
            self._pending -= 1
            if not self._pending:
                self._idle.set()

    def _run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str], queued_at: int
    ) -> tuple[list[np.ndarray], ExecutionTiming]:
        start = time.perf_counter_ns()
        slot = getattr(self._slot, "index", None)
        if slot is None:
            slot = self._slot.index = next(self._next_slot) % self._instances
        ready = time.perf_counter_ns()
        result = self.model.run(feeds, outputs, slot)
        done = time.perf_counter_ns()
        return result, ExecutionTiming(start - queued_at, ready - start, done - ready, 0)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending; False when the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Stop the worker threads (after a drain) and release the sessions."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.model.close()
