"""Per-version request queue and dynamic batch formation, running ONNX Runtime off the loop.

Every request of a version goes through its :class:`Batcher`. One worker per model instance
(ONNX Runtime session) takes work from a bounded queue:

* **Batching on** (``max_batch_size > 0`` and dynamic batching enabled): a free worker takes
  whatever is queued, oldest first, up to ``max_batch_size`` rows, joining only requests whose
  non-batch dims, datatypes and requested outputs agree. With ``max_queue_delay_microseconds``
  > 0 it then waits, up to that delay counted from the oldest request, for the batch to fill to
  a preferred size or to ``max_batch_size``. With the default delay of 0 nothing waits: at low
  load a request runs alone at once (latency), at high load requests pile up while the
  instances are busy and run together (throughput).
* **Batching off**: each request is one execution.

Requests are counted in rows. Over ``max_queue_size`` queued requests, ``submit`` raises
:class:`Overloaded` at once. A request still queued when its timeout expires is rejected with
:class:`Overloaded` too (both are load shedding: HTTP 429 / RESOURCE_EXHAUSTED). A caller that
goes away (its task is cancelled) leaves the queue before it runs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from onnxgate.core.metrics import Metrics
from onnxgate.core.model import ModelVersion
from onnxgate.core.stats import ExecutionTiming, VersionStats
from onnxgate.errors import InferenceFailed, Overloaded, Unavailable
from onnxgate_client.pb import model_config_pb2 as mc


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How a version's queue is bounded and its batches formed."""

    enabled: bool = False
    max_batch_size: int = 1
    max_queue_delay_ns: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024
    default_timeout_ns: int = 0  # 0 = no timeout
    allow_timeout_override: bool = True


@dataclass(eq=False, slots=True)
class _Pending:
    feeds: Mapping[str, np.ndarray]
    rows: int
    outputs: tuple[str, ...]
    key: tuple
    future: asyncio.Future
    enqueued_ns: int
    timer: asyncio.TimerHandle | None = field(default=None)
    shadow: bool = False


class Batcher:
    """The queue and workers of one model version."""

    def __init__(
        self, model: ModelVersion, stats: VersionStats, policy: BatchPolicy, metrics: Metrics | None = None
    ) -> None:
        self.model = model
        self.metrics = metrics or Metrics()
        labels = (model.name, str(model.version))
        self._m_batch = self.metrics.batch_rows.labels(*labels)
        self._m_queue_wait = self.metrics.queue_wait.labels(*labels)
        self._m_compute = self.metrics.compute_latency.labels(*labels)
        self._m_depth = self.metrics.queue_depth.labels(*labels)
        self.stats = stats
        self.policy = policy
        self.instances = max(1, len(model.sessions))
        self._threads = [_InstanceThread(f"ort-{model.name}-{model.version}-{i}") for i in range(self.instances)]
        self._queue: deque[_Pending] = deque()
        self._waiters: list[asyncio.Future] = []  # idle or filling workers waiting for arrivals
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = 0
        self._workers = [asyncio.get_running_loop().create_task(self._worker(i)) for i in range(self.instances)]

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(
        self,
        feeds: Mapping[str, np.ndarray],
        rows: int,
        outputs: Sequence[str],
        timeout_us: int | None = None,
        shadow: bool = False,
    ) -> tuple[list[np.ndarray], ExecutionTiming]:
        """Queue one validated request and wait for its own rows of ``outputs``.

        Shadow requests are the first shed: refused once the queue is half full, and evicted
        (newest first) to make room for a primary request when it is full."""
        if shadow and len(self._queue) >= self.policy.max_queue_size // 2:
            raise Overloaded(f"model '{self.model.name}': shadow request shed under load", reason="shadow_shed")
        if len(self._queue) >= self.policy.max_queue_size and not (not shadow and self._evict_shadow()):
            raise Overloaded(
                f"model '{self.model.name}' version {self.model.version}: queue is full "
                f"({self.policy.max_queue_size} requests waiting)"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter_ns()
        key = self._key(feeds, outputs)
        item = _Pending(feeds, rows, tuple(outputs), key, loop.create_future(), now, shadow=shadow)
        timeout_ns = self.policy.default_timeout_ns
        if timeout_us and (not timeout_ns or self.policy.allow_timeout_override):
            timeout_ns = timeout_us * 1000 if not timeout_ns else min(timeout_ns, timeout_us * 1000)
        if timeout_ns > 0:
            item.timer = loop.call_later(timeout_ns / 1e9, self._expire, item)
        self._queue.append(item)
        self._m_depth.set(len(self._queue))
        self._idle.clear()
        self._wake()
        try:
            return await item.future
        except asyncio.CancelledError:
            item.future.cancel()  # a worker that has not taken it yet will skip it
            raise
        finally:
            if item.timer is not None:
                item.timer.cancel()

    def _evict_shadow(self) -> bool:
        """Fail the newest queued shadow request to free its place; False when there is none."""
        for i in range(len(self._queue) - 1, -1, -1):
            item = self._queue[i]
            if item.shadow and not item.future.done():
                del self._queue[i]
                item.future.set_exception(
                    Overloaded(f"model '{self.model.name}': shadow request shed under load", reason="shadow_shed")
                )
                return True
        return False

    def _key(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str]) -> tuple:
        if not self.policy.enabled:
            return ()
        return (tuple((n, a.shape[1:], a.dtype.str) for n, a in feeds.items()), tuple(outputs))

    def _expire(self, item: _Pending) -> None:
        if not item.future.done():
            item.future.set_exception(
                Overloaded(
                    f"model '{self.model.name}' version {self.model.version}: request timed out "
                    f"after waiting {(time.perf_counter_ns() - item.enqueued_ns) / 1e6:.1f} ms in the queue",
                    reason="timeout",
                )
            )

    # -- workers -----------------------------------------------------------------------------
    def _take(self, batch: list[_Pending], rows: int) -> int:
        """Move compatible queued requests into ``batch``; returns the batch's rows."""
        limit = self.policy.max_batch_size if self.policy.enabled else 1
        key = batch[0].key if batch else None
        skipped: list[_Pending] = []
        queue = self._queue
        while queue:
            item = queue[0]
            if item.future.done():  # cancelled or timed out while queued
                queue.popleft()
                continue
            if key is None:
                key = item.key
            if item.key != key:
                skipped.append(queue.popleft())
                if len(skipped) > 64:
                    break
                continue
            if batch and (not self.policy.enabled or rows + item.rows > limit):
                break
            batch.append(queue.popleft())
            rows += item.rows
            if rows >= limit:
                break
        queue.extendleft(reversed(skipped))
        return rows

    def _batch_done(self, rows: int) -> bool:
        p = self.policy
        return rows >= p.max_batch_size or rows in p.preferred_batch_sizes

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _arrival(self, timeout_s: float | None = None) -> None:
        """Wait for the next submit (or the timeout); no task is created."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(timeout_s, _resolve, waiter) if timeout_s is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    async def _worker(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        delay_ns = self.policy.max_queue_delay_ns if self.policy.enabled else 0
        while True:
            if not self._queue:
                if not self._running:
                    self._idle.set()
                await self._arrival()
                continue
            batch: list[_Pending] = []
            rows = self._take(batch, 0)
            self._m_depth.set(len(self._queue))
            if not batch:
                continue
            if delay_ns and not self._batch_done(rows):
                deadline = batch[0].enqueued_ns + delay_ns
                while not self._batch_done(rows) and (left := deadline - time.perf_counter_ns()) > 0:
                    if not self._queue:
                        await self._arrival(left / 1e9)
                        if not self._queue:
                            break  # the delay is over
                    before = len(batch)
                    rows = self._take(batch, rows)
                    if len(batch) == before and self._queue:
                        break  # what is queued does not fit this batch
            batch = [b for b in batch if not b.future.done()]
            if not batch:
                continue
            self._running += 1
            try:
                await self._execute(loop, batch, slot)
            finally:
                self._running -= 1

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], slot: int) -> None:
        started = time.perf_counter_ns()
        rows = sum(b.rows for b in batch)
        try:
            results, timing = await self._threads[slot].run(loop, self._run, batch, slot)
        except InferenceFailed as exc:
            for b in batch:
                if not b.future.done():
                    b.future.set_exception(exc)
            return
        except Exception as exc:  # never leave a caller waiting
            failure = InferenceFailed(f"model '{self.model.name}': {exc}")
            for b in batch:
                if not b.future.done():
                    b.future.set_exception(failure)
            return
        self.stats.record_execution(rows, timing)
        self._m_batch.observe(rows)
        self._m_compute.observe(timing.infer_ns / 1e9)
        for b in batch:
            self._m_queue_wait.observe((started - b.enqueued_ns) / 1e9)
        if len(batch) == 1:
            b = batch[0]
            if not b.future.done():
                b.future.set_result((results, _with_queue(timing, started - b.enqueued_ns)))
            return
        offset = 0
        for b in batch:
            if not b.future.done():
                own = [r[offset : offset + b.rows] for r in results]
                b.future.set_result((own, _with_queue(timing, started - b.enqueued_ns)))
            offset += b.rows

    def _run(self, batch: list[_Pending], slot: int) -> tuple[list[np.ndarray], ExecutionTiming]:
        t0 = time.perf_counter_ns()
        outputs = batch[0].outputs
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {n: np.concatenate([b.feeds[n] for b in batch]) for n in batch[0].feeds}
        t1 = time.perf_counter_ns()
        results = self.model.run(feeds, outputs, slot)
        t2 = time.perf_counter_ns()
        if len(batch) > 1:
            rows = sum(b.rows for b in batch)
            for name, r in zip(outputs, results, strict=True):
                if r.ndim == 0 or r.shape[0] != rows:
                    raise InferenceFailed(
                        f"model '{self.model.name}': output '{name}' has shape {list(r.shape)}, "
                        f"not {rows} rows; it cannot be batched"
                    )
        return results, ExecutionTiming(0, t1 - t0, t2 - t1, time.perf_counter_ns() - t2)

    # -- lifecycle ---------------------------------------------------------------------------
    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False when the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop the workers, fail what is still queued, release the sessions."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(
                    Unavailable(f"model '{self.model.name}' version {self.model.version} was unloaded")
                )
        for t in self._threads:
            await asyncio.to_thread(t.close)
        self.model.close()


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _set_result(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class _InstanceThread:
    """One thread per instance, handed work through a queue: cheaper than an executor hop
    (no concurrent.futures.Future, no chaining), and each session always runs on its thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

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
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def _with_queue(timing: ExecutionTiming, queue_ns: int) -> ExecutionTiming:
    return ExecutionTiming(queue_ns, timing.input_ns, timing.infer_ns, timing.output_ns)


def policy_from_config(config: mc.ModelConfig, default_max_queue_size: int = 1024) -> BatchPolicy:
    """The batch policy a completed ModelConfig asks for.

    Dynamic batching is on for every model with ``max_batch_size > 0`` unless the config's
    parameters say ``dynamic_batching: "off"``. Without a queue policy the queue holds
    ``default_max_queue_size`` requests and a request's own ``timeout`` is honoured; with a
    ``default_timeout_microseconds``, a request may only shorten it, and only when
    ``allow_timeout_override`` is set.
    """
    db = config.dynamic_batching
    qp = db.default_queue_policy
    switch = config.parameters["dynamic_batching"].string_value if "dynamic_batching" in config.parameters else ""
    enabled = config.max_batch_size > 0 and switch.lower() not in ("off", "false", "0", "no")
    return BatchPolicy(
        enabled=enabled,
        max_batch_size=max(1, config.max_batch_size),
        max_queue_delay_ns=db.max_queue_delay_microseconds * 1000,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_size=qp.max_queue_size or default_max_queue_size,
        default_timeout_ns=qp.default_timeout_microseconds * 1000,
        allow_timeout_override=qp.allow_timeout_override,
    )
